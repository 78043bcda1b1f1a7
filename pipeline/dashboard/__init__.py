"""The fleet dashboard: HTML over the fleet store, live; JSON API; Prometheus ``/metrics``."""

from .server import Dashboard, new_token
from .views import BudgetBook, FleetView

__all__ = ["BudgetBook", "Dashboard", "FleetView", "new_token"]
