"""The fit stage: search compression x quantization for the most accurate model that meets a class's budgets."""

from .search import Candidate, FitResult, require_best, run_fit  # noqa: F401
