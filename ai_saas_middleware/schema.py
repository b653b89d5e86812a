"""The JSON Schema of the configuration (``ai-saas schema``), recorded from the loader.

:func:`build_schema` returns a JSON Schema (draft 2020-12) of ``ai-saas-config.yaml``, for
editors that validate and complete YAML as it is typed (the YAML language server:
``# yaml-language-server: $schema=./ai-saas-config.schema.json`` on the file's first
line). It is not kept beside the loader: it is recorded from it. :class:`_Recorder` is a
:class:`~ai_saas_middleware.config._Reader` that runs the loader's own ``_read_*``
functions (``config._build``) and notes, for each path, the reader method that reads it
and its arguments: ``mapping`` and its known keys (an object without other keys),
``items`` (an array), ``string`` and its pattern, ``integer`` and its minimum and
``unlimited``, ``decimal`` and its bounds, ``duration``, ``boolean``, ``choice`` and its
options, ``string_list``, a missing default (a required key), a default. The few values
the loader checks by hand (``modelCatalog``, API key digests, HTTP methods, the least
``dedupeTtl`` and ``reservationTimeout``) are stated next to their check with
``_Reader.declare``. The recorder reads no example file: its ``mapping`` answers with a
non-empty probe and its ``items`` with one item, so every call of every ``_read_*``
function is reached, and a list index is recorded as the list's ``items``. A key the
loader accepts but no reader call describes makes :func:`build_schema` fail (the tests
run it), so the schema cannot silently miss one.

Why not pydantic (or another model library) in place of the hand-written loader: its
schema would come for free, but the loader's messages are part of its contract and are
tested word for word (``tenant.tiers[1].rateLimit: expected a whole number >= 1 or
'unlimited', found number 0``, the key digest never echoed back, every problem of a file
at once, the YAML floats read as exact decimals, cross-checks of tiers, models and key
digests). Keeping those would mean translating each validation error back into them and
re-checking what a model cannot express; recording the loader keeps one definition with
no new dependency and no risk to the messages.

What the schema says, in the loader's terms:

* ``null`` (a key written with no value) is allowed wherever the loader takes it as
  absent: every optional key, every section, every item of a list of mappings.
* A decimal is a number or a string of one (prices are quoted to stay exact); a duration
  a number of seconds or a string such as ``250ms``; a limit a whole number or
  ``unlimited``. A string's bounds, and the upper bound of a quoted decimal, are not
  checked by the schema (JSON Schema compares numbers only); ``check-config`` does.
* Model profiles may leave out what ``modelCatalog`` fills, when there is one.
* What needs the whole file stays with ``check-config``: a tenant's tier among the tiers,
  models with a profile, ids used once, the catalog file itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import config as _config
from .config import _MISSING, _Reader

__all__ = ["SCHEMA_DIALECT", "build_schema", "render_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_PROBE_KEY = "\0probe"  # a key no reader reads: makes a probe mapping non-empty
_INDEX = re.compile(r"\[\d*\]")
# Python regex syntax that ECMA-262 (JSON Schema's dialect) lacks or reads otherwise.
_NOT_ECMA = re.compile(r"\(\?P|\(\?[aiLmsux]|\\A|\\z|\(\?#")


def _ecma(pattern: re.Pattern[str]) -> str:
    """A Python pattern used with ``.match`` as the ECMA-262 pattern that accepts the
    same strings (``match`` anchors at the start). ``\\Z`` becomes ``$(?!\\n)``: ECMA's
    ``$`` is the end already, but validators in Python (jsonschema, check-jsonschema)
    read ``$`` as Python does, where it also matches before a final newline."""
    if pattern.flags & ~re.UNICODE or _NOT_ECMA.search(pattern.pattern):
        raise ValueError(f"pattern {pattern.pattern!r} has no ECMA-262 equivalent here")
    text = pattern.pattern.replace(r"\Z", r"$(?!\n)")
    return text if text.startswith("^") else f"^(?:{text})"


def _case_insensitive(word: str) -> str:
    if not word.isalnum():  # an escape would read differently in ECMA-262's unicode mode
        raise ValueError(f"{word!r}: only letters and digits are matched without case")
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


def _choice(options: tuple[str, ...], case_insensitive: bool = False,
            spaces: bool = False) -> dict[str, Any]:
    """One of ``options``: an enum (what editors complete), and when the loader ignores
    case (and surrounding spaces), a pattern that accepts what it accepts."""
    enum: dict[str, Any] = {"enum": list(options)}
    if not case_insensitive:
        return enum
    space = r"\s*" if spaces else ""
    words = "|".join(_case_insensitive(option) for option in options)
    return {"anyOf": [enum, {"type": "string", "pattern": f"^{space}(?:{words}){space}$"}]}


def _number(value: Any) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


def _decimal_string(minimum: Decimal | None) -> dict[str, Any]:
    sign = "[+-]?" if minimum is None or minimum < 0 else r"\+?"
    return {"type": "string",
            "pattern": rf"^\s*{sign}(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$"}


def _duration(minimum: float = 0) -> dict[str, Any]:
    return {"anyOf": [{"type": "number", "minimum": _number(minimum)},
                      {"type": "string", "pattern": _ecma(_config._DURATION_RE)}],
            "description": _config._DURATION_HINT
            + (f", at least {_number(minimum)}s" if minimum else ""),
            "examples": [f"{n}{unit}" for unit, n in _config._DURATION_EXAMPLES.items()]}


class _Recorder(_Reader):
    """A reader that records, path by path, what the loader's reader calls accept.

    Paths are the loader's own (``tenant.tiers[0].name``) with list indices generalised
    (``tenant.tiers[].name``)."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.known: dict[str, tuple[str, ...]] = {}
        self.required: dict[str, list[str]] = {}
        self.nullable: set[str] = set()

    # -- recording

    def _note(self, path: str, fragment: Mapping[str, Any], *, nullable: bool = True) -> None:
        path = _INDEX.sub("[]", path)
        self.nodes.setdefault(path, {}).update(fragment)
        if nullable:
            self.nullable.add(path)

    def _value(self, parent: str, key: str, default: Any, fragment: dict[str, Any]) -> None:
        parent = _INDEX.sub("[]", parent)
        if default is _MISSING:
            required = self.required.setdefault(parent, [])
            if key not in required:
                required.append(key)
        elif default is not None:
            fragment = {**fragment, "default": default}
        self._note(f"{parent}.{key}" if parent else key, fragment,
                   nullable=default is not _MISSING)

    # -- the reader's methods: note, then read as the loader does

    def problem(self, path: str, expected: str, found: str) -> None:
        pass  # the probe is not a configuration: its "problems" mean nothing

    def declare(self, path: str, kind: str, **facts: Any) -> None:
        if kind == "string":
            fragment: dict[str, Any] = {"type": "string", "description": facts["what"]}
            if facts.get("pattern") is not None:
                fragment["pattern"] = _ecma(facts["pattern"])
        elif kind == "choice":
            fragment = _choice(tuple(facts["options"]), facts.get("case_insensitive", False))
        elif kind == "duration":
            fragment = _duration(facts.get("minimum", 0))
        else:
            raise ValueError(f"declare({path!r}): unknown kind {kind!r}")
        self._note(path, fragment, nullable=not path.endswith("[]"))

    def mapping(self, value: Any, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
        path = _INDEX.sub("[]", path)
        self.known[path] = tuple(dict.fromkeys(self.known.get(path, ()) + tuple(known)))
        self._note(path, {"type": "object"}, nullable=bool(path))
        return {_PROBE_KEY: None}

    def items(self, value: Any, path: str) -> list[Any]:
        self._note(path, {"type": "array"})
        return [None]  # one item, so that the item's reader calls run too

    def string(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
               pattern: re.Pattern[str] | None = None, what: str = "a string") -> Any:
        fragment: dict[str, Any] = {"type": "string"}
        if pattern is not None:
            fragment["pattern"] = _ecma(pattern)
        if what != "a string":
            fragment["description"] = what
        self._value(path, key, default, fragment)
        return super().string(m, key, path, default, pattern, what)

    def integer(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
                minimum: int = 0, unlimited: bool = False) -> Any:
        whole: dict[str, Any] = {"type": "integer", "minimum": minimum}
        fragment = whole
        if unlimited:
            fragment = {"anyOf": [whole, *_choice(("unlimited",), True, spaces=True)["anyOf"]]}
        self._value(path, key, default, fragment)
        return super().integer(m, key, path, default, minimum, unlimited)

    def decimal(self, m: Mapping[str, Any], key: str, path: str, default: Any = _MISSING,
                minimum: Decimal = Decimal(0), maximum: Decimal | None = None) -> Any:
        number: dict[str, Any] = {"type": "number", "minimum": _number(minimum)}
        if maximum is not None:
            number["maximum"] = _number(maximum)
        fragment = {"anyOf": [number, _decimal_string(minimum)],
                    "description": "a decimal number, plain or quoted (\"0.00000015\": "
                                   "exact in every YAML tool)"}
        self._value(path, key, _number(default) if isinstance(default, Decimal) else default,
                    fragment)
        return super().decimal(m, key, path, default, minimum, maximum)

    def duration(self, m: Mapping[str, Any], key: str, path: str, default: float) -> float:
        self._value(path, key, _number(default), _duration())
        return super().duration(m, key, path, default)

    def boolean(self, m: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        self._value(path, key, default, {"type": "boolean"})
        return super().boolean(m, key, path, default)

    def choice(self, m: Mapping[str, Any], key: str, path: str, options: tuple[str, ...],
               default: Any) -> Any:
        self._value(path, key, default, _choice(options))
        return super().choice(m, key, path, options, default)

    def string_list(self, m: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        self._note(f"{path}.{key}[]", {"type": "string", "minLength": 1}, nullable=False)
        return super().string_list(m, key, path)  # its items() notes the list itself

    # -- the schema

    def schema_of(self, path: str) -> dict[str, Any]:
        """The schema of the value at ``path`` (generalised), from what was recorded."""
        if path not in self.nodes:
            raise LookupError(f"the loader accepts {path or 'a top level'!r} but no reader "
                              "call describes it: the schema cannot say what it is")
        node = dict(self.nodes[path])
        if path in self.known:
            node["properties"] = {key: self.schema_of(f"{path}.{key}" if path else key)
                                  for key in self.known[path]}
            node["additionalProperties"] = False
            if self.required.get(path):
                node["required"] = list(self.required[path])
        if node.get("type") == "array":
            node["items"] = self.schema_of(f"{path}[]")
        return _nullable(node) if path in self.nullable else node


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` that also accepts null (a key written with no value: the loader's absent)."""
    if isinstance(node.get("type"), str):
        return {**node, "type": [node["type"], "null"]}
    if "enum" in node:
        return {**node, "enum": [*node["enum"], None]}
    if "anyOf" in node:
        return {**node, "anyOf": [*node["anyOf"], {"type": "null"}]}
    raise ValueError(f"cannot make {node!r} nullable")


def _catalog_rule(recorder: _Recorder, schema: dict[str, Any]) -> None:
    """Model profiles need what ``modelCatalog`` would fill only when there is none."""
    models = "models[]"
    filled = [key for key in recorder.required.get(models, ())
              if key in _config._catalog_fields({})]
    item = schema["properties"]["models"]["items"]
    item["required"] = [key for key in item.get("required", []) if key not in filled]
    schema["if"] = {"properties": {"modelCatalog": {"type": "string"}},
                    "required": ["modelCatalog"]}
    schema["else"] = {"properties": {"models": {"items": {"required": filled}}}}


def build_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the configuration, recorded from the loader.

    Returns:
        A JSON-serialisable dict; keys in the loader's order.

    Raises:
        LookupError: the loader accepts a key that no reader call describes (a defect of
            the loader's hooks, caught by the tests).
    """
    recorder = _Recorder()
    _config._build({}, "<schema probe>", None, reader=recorder)
    body = recorder.schema_of("")
    schema: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": "ai-saas-middleware configuration (ai-saas-config.yaml)",
        "description": "Written by 'ai-saas schema' from the loader's definitions. "
                       "'ai-saas check-config' also checks what needs the whole file "
                       "(tiers named, model profiles, ids used once).",
        **body,
    }
    _catalog_rule(recorder, schema)
    return schema


def render_schema() -> str:
    """:func:`build_schema` as JSON text, 2-space indent, ending in a newline."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"
