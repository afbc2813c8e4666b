"""Declared plugin parameters become one strict pydantic model that checks job data."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kinod.params import ParameterSpec, build_params_model, check_data, format_validation_error


def check(parameters: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return check_data(build_params_model("p", parameters), data)


def errors(parameters: dict[str, Any], data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        build_params_model("p", parameters).model_validate(data)
    return format_validation_error(info.value, prefix="data")


def test_model_is_named_for_the_plugin() -> None:
    model = build_params_model("sdxl", {"prompt": {"type": "string"}})
    assert issubclass(model, BaseModel)
    assert model.__name__ == "sdxl_parameters"
    assert {field.alias for field in model.model_fields.values()} == {"prompt"}


def test_no_parameters_takes_no_data() -> None:
    model = build_params_model("p", {})
    assert check_data(model, {}) == {}
    with pytest.raises(ValidationError):
        model.model_validate({"anything": 1})


@pytest.mark.parametrize(("declared", "good", "bad"), [
    ("string", "text", 5),
    ("str", "text", 5),
    ("integer", 5, "5"),
    ("int", 5, 5.5),
    ("number", 5.5, "5.5"),
    ("float", 5.5, "x"),
    ("boolean", True, "true"),
    ("bool", False, 0),
    ("array", [1, "a"], "a,b"),
    ("list", [], {"a": 1}),
    ("object", {"a": 1}, [1]),
    ("dict", {}, "x"),
    ("STRING", "case of the type does not matter", 5),
])
def test_types(declared: str, good: Any, bad: Any) -> None:
    parameters = {"x": {"type": declared, "required": True}}
    assert check(parameters, {"x": good}) == {"x": good}
    assert [line.split(":")[0] for line in errors(parameters, {"x": bad})] == ["data.x"]


def test_any_type_takes_anything() -> None:
    for value in ("a", 1, [1], {"a": None}, [None]):
        assert check({"x": {"type": "any"}}, {"x": value}) == {"x": value}
    assert check({"x": {}}, {"x": 3}) == {"x": 3}  # "any" is the default type


def test_integer_is_accepted_as_a_number() -> None:
    assert check({"cfg": {"type": "number"}}, {"cfg": 7}) == {"cfg": 7}


def test_boolean_is_not_an_integer() -> None:
    assert errors({"n": {"type": "integer"}}, {"n": True})[0].startswith("data.n:")


def test_required() -> None:
    parameters = {"prompt": {"type": "string", "required": True}}
    assert errors(parameters, {}) == ["data.prompt: required"]
    assert errors(parameters, {"prompt": None})[0].startswith("data.prompt:")


def test_optional_with_and_without_default() -> None:
    parameters = {"steps": {"type": "integer", "default": 10}, "seed": {"type": "integer"}}
    assert check(parameters, {}) == {"steps": 10}
    assert check(parameters, {"steps": 3, "seed": 7}) == {"steps": 3, "seed": 7}


def test_optional_without_default_is_absent_unless_given() -> None:
    model = build_params_model("p", {"seed": {"type": "integer"}})
    assert check_data(model, {}) == {}
    assert check_data(model, {"seed": 7}) == {"seed": 7}


# --- null: in YAML `steps:` with no value is null, and means "the default" ------------------

NULLABLE = {
    "prompt": {"type": "string", "required": True},
    "steps": {"type": "integer", "default": 10, "minimum": 1},
    "cfg": {"type": "number", "default": 7.5},
    "sampler": {"type": "string", "default": "euler", "enum": ["euler", "heun"]},
    "tags": {"type": "array", "default": ["a"]},
    "extra": {"type": "any", "default": {"k": 1}},
    "seed": {"type": "integer"},  # no default
}


def test_a_parameter_given_as_null_counts_as_left_out() -> None:
    nulls = {name: None for name in NULLABLE if name != "prompt"}
    expected = {"prompt": "p", "steps": 10, "cfg": 7.5, "sampler": "euler", "tags": ["a"],
                "extra": {"k": 1}}
    assert check(NULLABLE, {"prompt": "p", **nulls}) == expected
    assert check(NULLABLE, {"prompt": "p"}) == expected
    # A default is never shared between jobs, null or not.
    first = check(NULLABLE, {"prompt": "p", "tags": None})
    first["tags"].append("b")
    assert check(NULLABLE, {"prompt": "p", "tags": None})["tags"] == ["a"]


def test_a_required_parameter_given_as_null_is_reported_required() -> None:
    with pytest.raises(ValidationError) as info:
        check(NULLABLE, {"prompt": None, "steps": None})
    assert format_validation_error(info.value, prefix="data") == ["data.prompt: required"]


def test_null_for_a_key_that_is_no_parameter_is_still_an_unknown_key() -> None:
    with pytest.raises(ValidationError) as info:
        check(NULLABLE, {"prompt": "p", "colour": None})
    assert format_validation_error(info.value, prefix="data") == ["data.colour: unknown key"]


def test_null_inside_a_value_is_kept() -> None:
    assert check(NULLABLE, {"prompt": "p", "extra": {"k": None}, "tags": [None]}) == {
        "prompt": "p", "steps": 10, "cfg": 7.5, "sampler": "euler", "tags": [None],
        "extra": {"k": None}}


def test_parameters_may_have_any_name() -> None:
    names = ["model_config", "schema", "copy", "json", "dict", "validate", "p0"]
    model = build_params_model("p", {name: {"type": "integer", "required": True} for name in names})
    data = {name: i for i, name in enumerate(names)}
    assert check_data(model, data) == data


def test_minimum_and_maximum_are_inclusive() -> None:
    parameters = {"steps": {"type": "integer", "minimum": 1, "maximum": 100}}
    assert check(parameters, {"steps": 1}) == {"steps": 1}
    assert check(parameters, {"steps": 100}) == {"steps": 100}
    low = errors(parameters, {"steps": 0})
    high = errors(parameters, {"steps": 101})
    assert low == ["data.steps: Input should be greater than or equal to 1"]
    assert high == ["data.steps: Input should be less than or equal to 100"]


def test_minimum_on_a_number() -> None:
    parameters = {"cfg": {"type": "number", "minimum": 0.5, "maximum": 30}}
    assert check(parameters, {"cfg": 0.5}) == {"cfg": 0.5}
    assert errors(parameters, {"cfg": 0.4})[0].startswith("data.cfg:")


def test_enum() -> None:
    parameters = {"sampler": {"type": "string", "enum": ["euler", "dpmpp_2m_sde"],
                              "default": "euler"}}
    assert check(parameters, {}) == {"sampler": "euler"}
    assert check(parameters, {"sampler": "dpmpp_2m_sde"}) == {"sampler": "dpmpp_2m_sde"}
    assert errors(parameters, {"sampler": "ddim"})[0].startswith("data.sampler:")


def test_enum_of_numbers() -> None:
    parameters = {"size": {"type": "integer", "enum": [512, 1024], "required": True}}
    assert check(parameters, {"size": 1024}) == {"size": 1024}
    assert errors(parameters, {"size": 768})[0].startswith("data.size:")


def test_unknown_data_keys_are_rejected() -> None:
    parameters = {"prompt": {"type": "string", "required": True}}
    assert errors(parameters, {"prompt": "p", "stpes": 3}) == ["data.stpes: unknown key"]


def test_every_problem_is_reported() -> None:
    parameters = {"prompt": {"type": "string", "required": True},
                  "steps": {"type": "integer", "minimum": 1}}
    lines = errors(parameters, {"steps": 0, "colour": "red"})
    assert sorted(line.split(":")[0] for line in lines) == ["data.colour", "data.prompt",
                                                          "data.steps"]


def test_plugin_hints_beyond_the_known_keys_are_allowed() -> None:
    parameters = {"prompt": {"type": "string", "required": True, "example": "a cat",
                             "description": "What to draw"}}
    model = build_params_model("p", parameters)
    assert model.model_fields["p0"].alias == "prompt"
    assert model.model_fields["p0"].description == "What to draw"


def test_unknown_type_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"parameter 'size': unknown type 'complex'"):
        build_params_model("p", {"prompt": {"type": "string"}, "size": {"type": "complex"}})


def test_every_bad_declaration_is_named() -> None:
    with pytest.raises(ValueError) as info:
        build_params_model("p", {"a": {"type": "vector"}, "b": "string",
                                 "c": {"required": "perhaps"}, "ok": {"type": "string"}})
    message = str(info.value)
    assert "parameter 'a'" in message
    assert "parameter 'b'" in message
    assert "parameter 'c'" in message
    assert "parameter 'ok'" not in message


@pytest.mark.parametrize("declaration", [
    {"type": "string", "minimum": 1},
    {"type": "boolean", "maximum": 3},
    {"type": "string", "enum": ["a", "b"], "minimum": 1},
])
def test_bounds_on_a_type_without_order_are_a_bad_declaration(declaration: dict) -> None:
    # Refused when the plugin loads, naming the parameter; never a model that raises a bare
    # TypeError on the first job.
    with pytest.raises(ValueError, match="parameter 'x'"):
        build_params_model("p", {"x": declaration})


def test_parameter_spec_defaults() -> None:
    spec = ParameterSpec.model_validate({})
    assert (spec.type, spec.required, spec.default, spec.minimum, spec.maximum, spec.enum) == (
        "any", False, None, None, None, None)


def test_format_validation_error_names_nested_fields() -> None:
    model = build_params_model("p", {"size": {"type": "object", "required": True}})

    class Outer(BaseModel):
        inner: model  # type: ignore[valid-type]

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"inner": {"size": 3}})
    assert format_validation_error(info.value) == [
        "inner.size: Input should be a valid dictionary"]
    assert format_validation_error(info.value, prefix="job") == [
        "job.inner.size: Input should be a valid dictionary"]


def test_format_validation_error_at_the_top_level() -> None:
    model = build_params_model("p", {})
    with pytest.raises(ValidationError) as info:
        model.model_validate(["not", "a", "mapping"])
    lines = format_validation_error(info.value)
    assert len(lines) == 1
    assert lines[0].startswith("(top level): ")
