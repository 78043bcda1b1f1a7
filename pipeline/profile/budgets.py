"""The budget table: each budget of a target against the figure that answers it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..targets import Budgets

UNITS = {"latency_ms": "ms", "peak_memory_mb": "MB", "model_size_mb": "MB", "energy_mj": "mJ"}


@dataclass(frozen=True)
class BudgetRow:
    name: str
    limit: float
    value: float
    unit: str
    source: str  # predicted | measured | file
    margin: float  # (limit - value) / limit: negative when over

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = self.passed
        d["margin"] = round(self.margin, 4)
        return d


def evaluate(budgets: Budgets, figures: dict[str, tuple[float, str]]) -> list[BudgetRow]:
    """``figures`` maps a budget name to (value, source). Budgets left unset are not checked."""
    rows = []
    for name, limit in budgets.model_dump().items():
        if limit is None or name not in figures:
            continue
        value, source = figures[name]
        rows.append(BudgetRow(name, float(limit), round(float(value), 4), UNITS[name], source, (limit - value) / limit))
    return rows


def failures(rows: list[BudgetRow]) -> list[str]:
    return [f"{r.name}: {r.value:g} {r.unit} ({r.source}) > limit {r.limit:g} {r.unit}" for r in rows if not r.passed]
