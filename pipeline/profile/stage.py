"""The budget gate: a profiled model that misses a budget of its class stops the deployment, unless forced."""

from __future__ import annotations

from ..errors import BudgetError
from ..ui import UI
from . import ProfileReport


def budget_gate(prof: ProfileReport, model_name: str, ui: UI, force: bool = False) -> None:
    """Raise BudgetError (carrying the profile) when ``prof`` misses a budget; with ``force``, warn and go on."""
    if not prof.failures:
        return
    message = f"{model_name} does not fit {prof.target}:\n  " + "\n  ".join(prof.failures)
    if not force:
        raise BudgetError(message + "\nCompress harder, relax budgets in deploy.yaml, or pass --force.",
                          {"profile": prof.to_dict(), "budgets": [r.to_dict() for r in prof.budgets]})
    ui.warn(message + "\n  deploying anyway (--force)")
