"""A pydantic ValidationError as our one message: ``field.path: what is wrong``, one line per problem.

User input echoed in a message stays bounded; a recipe step's problems are labelled ``compress[0] (magnitude)``
and an unknown method lists the registered ones.
"""

from __future__ import annotations

from pydantic import ValidationError

from ..compress.params import METHODS


def short(text: str, limit: int = 80) -> str:
    """User input echoed in an error stays bounded."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _step_label(loc: tuple, steps_at: int | None) -> tuple[str, tuple] | None:
    """A recipe step's error, ``compress.0.magnitude.sparsity``, as ``compress[0] (magnitude)`` and the rest.
    ``steps_at``: where the step index sits in ``loc`` (None: deploy.yaml's compress and recipes.NAME)."""
    j = steps_at if steps_at is not None else 1 if loc[:1] == ("compress",) else 2 if loc[:1] == ("recipes",) else 0
    if not j or len(loc) <= j or not isinstance(loc[j], int):
        return None
    head = f"{'.'.join(short(str(p), 40) for p in loc[:j])}[{loc[j]}]"
    if len(loc) > j + 1 and loc[j + 1] in METHODS:
        return f"{head} ({loc[j + 1]})", loc[j + 2:]
    return head, loc[j + 1:]


def _step_message(err: dict) -> tuple[str, str] | None:
    """A step whose ``method`` picks no parameter model: the registry's own message, listing the methods."""
    if err["type"] == "union_tag_invalid":
        given = err.get("input", {}).get("method") if isinstance(err.get("input"), dict) else None
        if isinstance(given, str):
            try:
                METHODS.get(given)
            except LookupError as exc:
                return "method", str(exc).strip("'\"")
        return "method", f"got {short(repr(given))}; known: {', '.join(METHODS.names())}"
    if err["type"] == "union_tag_not_found":
        return "method", f"required: the compression method, one of {', '.join(METHODS.names())}"
    return None


def error_lines(exc: ValidationError, prefix: tuple = (), steps_at: int | None = None) -> list[str]:
    """A pydantic error as one ``field.path: what is wrong`` line per problem, user input echoed bounded."""
    lines = []
    for err in exc.errors():
        loc, msg = (*prefix, *err["loc"]), short(err["msg"], 300)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "literal_error":
            msg = f"got {short(repr(err.get('input')))}; {msg.lower()}"
        step = _step_label(loc, steps_at)
        if step is None:
            where = ".".join(short(str(p), 40) for p in loc) or "(top level)"
        else:
            where, rest = step
            tag = _step_message(err)
            if tag is not None:
                where, msg = f"{where}.{tag[0]}", tag[1]
            elif rest:
                msg = f"{'.'.join(short(str(p), 40) for p in rest)}: {msg}"
        lines.append(f"{where}: {msg}")
    return lines


def invalid(where: str, lines: list[str]) -> str:
    """The one message for several problems: ``where: invalid configuration``, then a line each."""
    return f"{where}: invalid configuration\n" + "\n".join(f"  {line}" for line in lines)


def format_validation_error(exc: ValidationError, where: str) -> str:
    return invalid(where, error_lines(exc))
