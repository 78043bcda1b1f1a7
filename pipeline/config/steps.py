"""deploy.yaml's ``compress:`` and ``recipes:`` steps: one typed model per registered compression method.

The models are built at import from the torch-free METHODS registry (pipeline/compress/params.py): a method's
parameter model plus its ``method`` tag, chosen by that tag (a discriminated union). Code that builds a recipe
may pass ``CompressStep``s or plain dicts instead; ``parse_steps`` validates them all in one pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, TypeAdapter, ValidationError,
                      create_model, model_serializer)

from ..compress.params import METHODS, Params
from ..errors import ConfigError
from .errors import error_lines, invalid


class CompressStep(BaseModel):
    """One step of a recipe as code builds it (``CompressStep(method="magnitude", sparsity=0.5)``); its
    parameters are checked when the recipe is built. deploy.yaml's steps are typed (``Step``) instead."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TypedStep(BaseModel):
    """What the typed steps add to a method's parameter model: its ``method`` tag (declared per method) and
    the same interface as ``CompressStep``. Dumps hold the keys that were given, as deploy.yaml had them."""

    method: str

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in type(self).model_fields if k in self.model_fields_set and k != "method"}

    def to_params(self) -> Params:
        """The method's parameter model, already validated (no second pass)."""
        cls = METHODS.get(self.method).params
        values = {k: getattr(self, k) for k in cls.model_fields}
        return cls.model_construct(_fields_set=self.model_fields_set - {"method"}, **values)

    @model_serializer(mode="wrap")
    def _given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if k == "method" or k in self.model_fields_set}


def _step_model(name: str) -> type[TypedStep]:
    params = METHODS.get(name).params
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) + "Step"
    return create_model(title, __base__=(params, TypedStep), __module__=__name__, __doc__=params.__doc__,
                        method=(Literal[name], Field(description=f"compression method {name!r}")))


def step_union() -> Any:
    """``compress:`` steps: one model per registered method, chosen by ``method`` (a discriminated union)."""
    models = tuple(_step_model(name) for name in METHODS.names())
    return Annotated[Union[models], Field(discriminator="method")]  # noqa: UP007 - built at run time


Step = step_union()
_STEPS = TypeAdapter(list[Step])  # type: ignore[valid-type]


def parse_steps(steps: list[Any], where: str = "deploy.yaml", key: str = "compress") -> list[TypedStep]:
    """Steps (``CompressStep``s, typed steps or plain dicts) validated in one pass; one ConfigError lists every
    problem, each line naming ``key[i] (method)`` and the field."""
    raw = [s.model_dump() if isinstance(s, BaseModel) else s for s in steps]
    try:
        return _STEPS.validate_python(raw)
    except ValidationError as exc:
        lines = error_lines(exc, (key,), steps_at=1)
    raise ConfigError(invalid(where, lines))
