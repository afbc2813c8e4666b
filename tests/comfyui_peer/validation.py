"""The test peer's prompt validation: ComfyUI's validate_prompt / validate_inputs, as each
version answers."""

from __future__ import annotations

import traceback
from typing import Any

from .recorded import error_item, type_name


class Validation:
    """``POST /prompt``'s checks (a part of ComfyUITestServer)."""

    def _validate_prompt(self, prompt: dict[str, Any]) -> tuple[bool, Any, list[str], Any]:
        info = self._node_info()
        if self.modern:
            for nid, node in prompt.items():
                if "class_type" not in node:
                    return False, error_item(
                        "invalid_prompt",
                        "Cannot execute because a node is missing the class_type property.",
                        f"Node ID '#{nid}'"), [], {}
                if node["class_type"] not in info:
                    return False, error_item(
                        "invalid_prompt",
                        f"Cannot execute because node {node['class_type']} does not exist.",
                        f"Node ID '#{nid}'"), [], {}
        # 2024: an unknown class_type raises KeyError here: the caller answers 500, as recorded.
        outputs = [nid for nid, node in prompt.items() if info[node["class_type"]]["output_node"]]
        if not outputs:
            return False, error_item("prompt_no_outputs", "Prompt has no outputs", ""), [], (
                {} if self.modern else [])
        good: list[str] = []
        failed: list[dict[str, Any]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for out in outputs:
            try:
                valid, reasons = self._validate_node(prompt, out, validated)
            except Exception as ex:
                valid, reasons = False, [error_item(
                    "exception_during_validation", "Exception when validating node", str(ex),
                    exception_type=type_name(ex), traceback=traceback.format_tb(ex.__traceback__))]
                validated[out] = (False, reasons)
            if valid:
                good.append(out)
                continue
            failed += reasons
            # Nodes downstream of a bad node fail without reasons of their own: not reported.
            for nid, (node_ok, why) in validated.items():
                if not node_ok and why:
                    entry = node_errors.setdefault(nid, {
                        "errors": why, "dependent_outputs": [],
                        "class_type": prompt[nid]["class_type"]})
                    entry["dependent_outputs"].append(out)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for e in failed)
            return False, error_item("prompt_outputs_failed_validation",
                                 "Prompt outputs failed validation", details), [], node_errors
        return True, None, good, node_errors

    def _validate_node(self, prompt: dict[str, Any], nid: str,
                       validated: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        if nid in validated:
            return validated[nid]
        inputs = prompt[nid]["inputs"]
        errors: list[dict[str, Any]] = []
        valid = True
        info = self._node_info()
        for name, spec in info[prompt[nid]["class_type"]]["input"]["required"].items():
            kind = spec[0]
            if name not in inputs:
                errors.append(error_item("required_input_missing", "Required input is missing",
                                     name, input_name=name))
                continue
            val = inputs[name]
            if isinstance(val, list):  # a link: [node_id, output_index]
                if len(val) != 2:
                    errors.append(error_item(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name, input_name=name, input_config=spec, received_value=val))
                    continue
                got = info[prompt[val[0]]["class_type"]]["output"][val[1]]
                if got != kind:
                    details = (f"{name}, received_type({got}) mismatch input_type({kind})"
                               if self.modern else f"{name}, {got} != {kind}")
                    errors.append(error_item(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        details, input_name=name, input_config=spec,
                        received_type=got, linked_node=val))
                    continue
                try:
                    valid = self._validate_node(prompt, val[0], validated)[0] and valid
                except Exception as ex:
                    valid = False
                    validated[val[0]] = (False, [error_item(
                        "exception_during_inner_validation", "Exception when validating inner node",
                        str(ex), input_name=name, input_config=spec, exception_message=str(ex),
                        exception_type=type_name(ex),
                        traceback=traceback.format_tb(ex.__traceback__), linked_node=val)])
                continue
            convert = {"INT": int, "FLOAT": float, "STRING": str}.get(kind) \
                if isinstance(kind, str) else None
            try:
                if convert is not None:
                    val = inputs[name] = convert(val)  # ComfyUI stores the converted value
            except Exception as ex:
                errors.append(error_item(
                    "invalid_input_type", f"Failed to convert an input value to a {kind} value",
                    f"{name}, {val}, {ex}", input_name=name, input_config=spec,
                    received_value=val, exception_message=str(ex)))
                continue
            limits = spec[1] if len(spec) > 1 else {}
            if "min" in limits and val < limits["min"]:
                errors.append(error_item(
                    "value_smaller_than_min", f"Value {val} smaller than min of {limits['min']}",
                    name, input_name=name, input_config=spec, received_value=val))
                continue
            if "max" in limits and val > limits["max"]:
                errors.append(error_item(
                    "value_bigger_than_max", f"Value {val} bigger than max of {limits['max']}",
                    name, input_name=name, input_config=spec, received_value=val))
                continue
            if prompt[nid]["class_type"] == "LoadImage" and name == "image":
                if val not in kind:  # its own VALIDATE_INPUTS: a file in the input folder
                    errors.append(error_item("custom_validation_failed",
                                         "Custom validation failed for node",
                                         f"image - Invalid image file: {val}", input_name=name,
                                         input_config=spec, received_value=val))
                continue
            if isinstance(kind, list) and val not in kind:
                # Long lists (scanned model files) are summarised, and their config left out.
                listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
                errors.append(error_item(
                    "value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                    input_name=name, input_config=None if len(kind) > 20 else spec,
                    received_value=val))
        result = (not errors and valid, errors)
        validated[nid] = result
        return result
