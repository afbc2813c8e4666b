"""Turns a plugin's declared ``parameters`` into a pydantic model that checks job data."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

_TYPES: dict[str, Any] = {
    "string": str,
    "str": str,
    "integer": int,
    "int": int,
    "number": float,
    "float": float,
    "boolean": bool,
    "bool": bool,
    "array": list,
    "list": list,
    "object": dict,
    "dict": dict,
    "any": Any,
}


class ParameterSpec(BaseModel):
    """One entry of ``get_plugin_info()["parameters"]``."""

    model_config = ConfigDict(extra="allow")  # plugins may add their own hints (e.g. "example")

    type: str = "any"
    required: bool = False
    default: Any = None
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    enum: list[Any] | None = None

    def annotation(self) -> Any:
        try:
            python_type = _TYPES[self.type.lower()]
        except KeyError:
            raise ValueError(
                f"unknown type {self.type!r} (one of {', '.join(sorted(_TYPES))})"
            ) from None
        if (self.minimum is not None or self.maximum is not None) and python_type not in (
                int, float):
            raise ValueError(f"minimum and maximum apply to numbers, not to {self.type!r}")
        if self.enum:
            return Literal[tuple(self.enum)]
        return python_type


class _StrictData(BaseModel):
    # Strict: "20" is not an integer and 1 is not a string; nothing is silently converted.
    model_config = ConfigDict(extra="forbid", strict=True)


def build_params_model(plugin_name: str, parameters: dict[str, Any]) -> type[BaseModel]:
    """Build the model once, when the plugin loads; raises ValueError naming the bad declaration."""
    fields: dict[str, Any] = {}
    problems = []
    # Fields get neutral names (p0, p1, ...) with the parameter's name as alias, so a
    # parameter may be called anything, "model_config" and "schema" included.
    for index, (name, raw) in enumerate(parameters.items()):
        try:
            spec = ParameterSpec.model_validate(raw)
            annotation = spec.annotation()
        except (ValidationError, ValueError) as exc:
            problems.append(f"parameter {name!r}: {_one_line(exc)}")
            continue
        constraints = {"ge": spec.minimum, "le": spec.maximum}
        constraints = {k: v for k, v in constraints.items() if v is not None}
        default = ... if spec.required else spec.default
        if not spec.required:
            annotation = annotation | None
        fields[f"p{index}"] = (annotation, Field(default, alias=str(name),
                                                 description=spec.description, **constraints))
    if problems:
        raise ValueError("; ".join(problems))
    return create_model(f"{plugin_name}_parameters", __base__=_StrictData, **fields)


def check_data(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked by a model from ``build_params_model``; raises ValidationError.

    A parameter given as null counts as left out: in YAML ``steps:`` with no value is
    null, and its writer means "the default". Defaults fill what the job left out; an
    optional parameter without a default stays absent; a required one is reported missing.
    Null for a key that is no parameter is still an unknown key.
    """
    declared = {info.alias or name for name, info in model.model_fields.items()}
    given = {name: value for name, value in data.items()
             if value is not None or name not in declared}
    checked = model.model_validate(given)
    return {name: value for name, value in checked.model_dump(by_alias=True).items()
            if value is not None}


# pydantic's wording for the two most common mistakes, in the words of a job file.
_PLAIN_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required"}


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One readable line per offending field, e.g. ``data.steps: Input should be ...``."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        message = _PLAIN_MESSAGES.get(err["type"], err["msg"])
        lines.append(f"{where or '(top level)'}: {message}")
    return lines


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(format_validation_error(exc))
    return str(exc)
