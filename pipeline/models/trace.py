"""Name the layer a failure happened in: hooks on every module record where a forward pass is."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")


def locate(model: nn.Module, fn: Callable[[], T]) -> tuple[T | None, str | None, BaseException | None]:
    """Run ``fn``; on an exception return the innermost module that had started and not finished."""
    stack: list[str] = []
    failed_in: list[str] = []
    handles = []

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:  # hooks must return None, or they would replace the module's output
        if stack:
            stack.pop()

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(n)))
        handles.append(module.register_forward_hook(lambda m, a, o: leave()))
    try:
        return fn(), None, None
    except Exception as exc:  # noqa: BLE001 - reported with the layer name by the caller
        failed_in.extend(stack)
        return None, (failed_in[-1] if failed_in else None), exc
    finally:
        for h in handles:
            h.remove()
