"""A CRD's CEL validation rules (``x-kubernetes-validations``), evaluated as kube-apiserver does.

Each rule runs at its schema node, for every value present there (each list item, each map
value), with ``self`` bound to that value typed by the schema: ``integer`` as int, ``number``
as double, objects as maps. A false rule is a field error at the node (plus the rule's
``fieldPath``) whose value is the node's type, e.g.
``spec.model: Invalid value: "object": source=path needs an absolute path``.

The rules are compiled once, when the CRD is installed, with cel-python (a pure-Python CEL
implementation). A rule this module cannot honour fails there, loudly, never by accepting
objects unchecked: one that does not compile, and one that uses what kube-apiserver has and
this module lacks (``messageExpression``, ``reason``, transition rules on ``oldSelf``). A rule
that fails while it runs (e.g. a Kubernetes CEL library function cel-python does not know) is
reported as a field error, so the object is refused.

On updates, a node whose value did not change skips its rules and those below it, as
kube-apiserver's validation ratcheting does: an object stored under older rules stays writable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy
from celpy import celtypes

from kvflock.local.fielderrors import ErrorType, FieldError

__all__ = ["Rules"]

_RULES = "x-kubernetes-validations"
_SUPPORTED_KEYS = {"rule", "message", "fieldPath"}


@dataclass(frozen=True)
class _Rule:
    text: str
    message: str
    field_path: str
    program: celpy.Runner


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    """`value` as the CEL value that kube-apiserver binds, typed by the schema."""
    if value is None:
        return None
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int | float):
        return celtypes.DoubleType(value) if schema.get("type") == "number" else celtypes.IntType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        items = schema.get("items") or {}
        return celtypes.ListType([_to_cel(items, item) for item in value])
    properties = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    return celtypes.MapType({
        celtypes.StringType(key): _to_cel(properties.get(key) or (extra if isinstance(extra, dict) else {}), item)
        for key, item in value.items()
    })


def _compile(schema: dict[str, Any], path: str, environment: celpy.Environment) -> Iterator[tuple[str, _Rule]]:
    for rule in schema.get(_RULES, []):
        where = f"{_RULES} rule {rule.get('rule')!r} at {path or '<root>'}"
        unsupported = set(rule) - _SUPPORTED_KEYS
        if unsupported:
            raise ValueError(f"{where}: {', '.join(sorted(unsupported))} is not supported by the local API server")
        try:
            program = environment.program(environment.compile(rule["rule"]))
        except celpy.CELParseError as exc:
            raise ValueError(f"{where} does not compile: {exc}") from exc
        if "oldSelf" in rule["rule"]:
            raise ValueError(f"{where}: transition rules (oldSelf) are not supported by the local API server")
        message = rule.get("message") or f"failed rule: {rule['rule']}"
        yield path, _Rule(rule["rule"], message, rule.get("fieldPath", ""), program)
    for name, sub in (schema.get("properties") or {}).items():
        yield from _compile(sub, f"{path}.{name}", environment)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _compile(schema[key], f"{path}[]", environment)


class Rules:
    """The compiled CEL rules of one structural schema."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self._schema = schema
        self._rules: dict[str, list[_Rule]] = {}  # schema node (".spec.router.pools[]") -> its rules
        for node, rule in _compile(schema, "", celpy.Environment()):
            self._rules.setdefault(node, []).append(rule)

    def errors(self, value: Any, old: Any = None) -> list[FieldError]:
        """The rules that `value` breaks (`old`: the stored object, on an update)."""
        return list(self._check(self._schema, value, old, "", ""))

    def _check(self, schema: dict[str, Any], value: Any, old: Any, node: str, path: str) -> Iterator[FieldError]:
        if value is None or (old is not None and old == value):
            return
        rules = self._rules.get(node, [])
        if rules:
            bound = {"self": _to_cel(schema, value)}
            for rule in rules:
                yield from _outcome(rule, bound, schema, path)
        for name, sub in (schema.get("properties") or {}).items():
            if isinstance(value, dict) and name in value:
                before = old.get(name) if isinstance(old, dict) else None
                yield from self._check(sub, value[name], before, f"{node}.{name}", f"{path}.{name}".lstrip("."))
        items, extra = schema.get("items"), schema.get("additionalProperties")
        if isinstance(value, list) and isinstance(items, dict):
            for index, item in enumerate(value):  # list items are not correlated with old ones
                yield from self._check(items, item, None, f"{node}[]", f"{path}[{index}]")
        if isinstance(value, dict) and isinstance(extra, dict):
            for key, item in value.items():
                before = old.get(key) if isinstance(old, dict) else None
                yield from self._check(extra, item, before, f"{node}[]", f"{path}.{key}".lstrip("."))


def _outcome(rule: _Rule, bound: dict[str, Any], schema: dict[str, Any], path: str) -> Iterator[FieldError]:
    where = f"{path}{rule.field_path}".lstrip(".") if rule.field_path else path
    node_type = schema.get("type", "object")
    try:
        result = rule.program.evaluate(bound)
    except celpy.CELEvalError as exc:
        # cel-python appends its whole activation to some messages; the first clause says it.
        reason = str(exc.args[0]).split(" (in activation")[0] if exc.args else repr(exc)
        yield FieldError(where, ErrorType.INVALID, node_type, f"rule evaluation error: {reason} ({rule.text})")
        return
    if not isinstance(result, celtypes.BoolType):
        yield FieldError(where, ErrorType.INVALID, node_type, f"rule did not return a bool ({rule.text})")
    elif not result:
        yield FieldError(where, ErrorType.INVALID, node_type, rule.message)
