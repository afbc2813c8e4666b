"""Turns a job file's bytes into a plain mapping, refusing what could harm the daemon.

YAML is read with libyaml's safe loader only. Before anything is built, one
pass over the parser's events measures the document: libyaml builds nested
values by recursion (50,000 levels of ``[`` crash the process), and aliases
and merge keys can expand a tiny file into billions of values. What comes
out holds only what JSON can (mappings with text keys, lists, text, numbers,
booleans, null; plus YAML dates for ``not_before``), so it can be stored as
the sidecar's ``task``.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import yaml

from kinod.errors import InvalidJob

MAX_NODES = 100_000  # values in a document once its aliases are expanded
MAX_DEPTH = 64       # levels of nesting

_PLAIN_TYPES = (str, int, float, bool, type(None), datetime.date)


class _StrictSafeLoader(yaml.CSafeLoader):
    """The C safe loader, refusing a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class says what is wrong
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_document(raw: bytes, suffix: str) -> dict[str, Any]:
    """The job file's mapping as written; InvalidJob if it is not one (syntax, encoding, size)."""
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as some Windows tools write, is fine
    except UnicodeDecodeError as exc:
        raise InvalidJob(f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                         f"at offset {exc.start})") from None
    if not text.strip():
        raise InvalidJob("is empty")
    try:
        if suffix.lower() == ".json":
            document = json.loads(text, object_pairs_hook=_json_mapping)
        else:
            _measure_yaml(text)
            document = yaml.load(text, Loader=_StrictSafeLoader)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"invalid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except yaml.YAMLError as exc:
        raise InvalidJob(f"invalid YAML: {_yaml_message(exc)}") from None
    except RecursionError:
        raise InvalidJob(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, OverflowError) as exc:  # a date like 2026-02-30, a 5,000-digit number
        raise InvalidJob(f"invalid value: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidJob(f"the top level must be a mapping, not {_kind(document)}")
    _check_values(document)
    return document


def _json_mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise InvalidJob(f"invalid JSON: duplicate key {key!r}")
        mapping[key] = value
    return mapping


def _measure_yaml(text: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or larger than MAX_NODES once its
    aliases are expanded, from the parser's events alone (nothing is built)."""
    total = 0
    depth = 0
    size_of: dict[str, int] = {}  # anchor -> values under it, aliases expanded
    open_anchors: list[tuple[str | None, int]] = []  # (anchor, total when it opened)
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_anchors):
                raise InvalidJob(f"invalid YAML: the alias *{event.anchor} refers to itself")
            total += size_of.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                size_of[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            depth += 1
            if depth > MAX_DEPTH:
                raise InvalidJob(f"nested too deeply (more than {MAX_DEPTH} levels)")
            open_anchors.append((event.anchor, total))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, opened_at = open_anchors.pop()
            if anchor:
                size_of[anchor] = total - opened_at + 1
        if total > MAX_NODES:
            raise InvalidJob(f"holds more than {MAX_NODES} values once its aliases are "
                             "expanded (a YAML alias bomb?)")


def _check_values(document: dict[str, Any]) -> None:
    """Only what JSON can hold, within the bounds; the first offender is named by its path."""
    stack: list[tuple[Any, str, int]] = [(document, "", 1)]
    count = 0
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise InvalidJob(f"holds more than {MAX_NODES} values")
        if depth > MAX_DEPTH and isinstance(value, dict | list):
            raise InvalidJob(f"nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str) or not _is_utf8(key):
                    raise InvalidJob(f"{where or '(top level)'}: the key {key!r} is not text")
                stack.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, str) and not _is_utf8(value):
            raise InvalidJob(f"{where}: holds a lone UTF-16 surrogate (\\ud800-\\udfff)")
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidJob(f"{where}: {value} cannot be stored as JSON")
        elif not isinstance(value, _PLAIN_TYPES):
            raise InvalidJob(f"{where}: {_kind(value)} cannot be stored as JSON")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _kind(value: Any) -> str:
    kinds = {list: "a list", str: "text", int: "a number", float: "a number", bool: "a boolean",
             bytes: "a binary value", set: "a set", tuple: "a list",
             type(None): "null (the file holds no values)"}
    return kinds.get(type(value), type(value).__name__)


def _yaml_message(exc: yaml.YAMLError) -> str:
    """libyaml's complaint and where, in one line, without its '<unicode string>' noise."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1} column {mark.column + 1}"
    return f"{problem} {context} at {where}" if context else f"{problem} at {where}"
