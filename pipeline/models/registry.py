"""The zoo's registry, apart from the zoo and the builders so that neither imports the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..registry import Registry

if TYPE_CHECKING:
    from torch import nn

#: factories take (input_shape CHW, num_classes) and return an untrained module
ModelFactory = Callable[[tuple[int, ...], int], "nn.Module"]
MODELS: Registry[ModelFactory] = Registry("zoo model")
