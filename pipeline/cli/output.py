"""What a command sends out besides its tables: JSON on stdout, a report on disk, an error line, an exit code.

The one place that turns outcomes into exit codes: a ``PipelineError`` exits with its class's ``exit_code``
(``pipeline.errors``), Ctrl-C with 130, and the commands that finish but did not get everything they asked for
return one of the names below. Commands hand their results here; none formats JSON itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import BudgetError, DeliveryError, PipelineError, ProvisionError

OK = 0
#: a model or a candidate misses a budget of its target (``fit``, ``profile``), as ``BudgetError`` exits
OVER_BUDGET = BudgetError.exit_code
#: some device did not activate (or roll back to) the model: the delivery table says which
DELIVERY_INCOMPLETE = DeliveryError.exit_code
#: some host could not be provisioned: the error lines under the table say why
PROVISION_FAILED = ProvisionError.exit_code
#: Ctrl-C (128 + SIGINT)
INTERRUPTED = 130


def to_json(data: Any, indent: int | None = 2) -> str:
    """Reports hold paths, timestamps and enums: anything JSON has no type for is written as its ``str``."""
    return json.dumps(data, indent=indent, default=str)


def dump(data: Any, *, indent: int | None = 2, flush: bool = False) -> None:
    """``data`` as JSON on stdout (the UI writes to stderr, so stdout is only ever JSON)."""
    print(to_json(data, indent), flush=flush)


def emit(args: argparse.Namespace, data: Any, *, indent: int | None = 2, flush: bool = False) -> bool:
    """``dump(data)`` when the command was given ``--json``; True if it did (the command then skips its table)."""
    if getattr(args, "json", False):
        dump(data, indent=indent, flush=flush)
        return True
    return False


def write_report(args: argparse.Namespace, report: Any) -> None:
    """``report`` to the ``--report FILE`` the command was given (atomically), if any."""
    path = getattr(args, "report", None)
    if path:
        from device_agent.storage import atomic_write_bytes

        atomic_write_bytes(Path(path), to_json(report).encode())


def error(ui, message: object) -> None:
    ui.console.print(f"[bold red]error:[/] {message}")


def run(command: Callable[[argparse.Namespace, Any], int], args: argparse.Namespace, ui) -> int:
    """Run one command; errors raised on purpose become one line and their exit code (a traceback with --debug)."""
    try:
        return command(args, ui)
    except PipelineError as exc:
        if args.debug:
            raise
        error(ui, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        ui.console.print("[red]interrupted[/]")
        return INTERRUPTED
