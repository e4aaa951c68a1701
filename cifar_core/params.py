"""Declared parameters and name registries.

Every configurable thing in the lab (a model, an augmentation, an LR schedule, an imbalance
strategy) is one function plus one registry entry that declares its parameters: type, default,
range. The CLI, the app's forms and config validation are all generated from these declarations.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


class ConfigError(ValueError):
    """A configuration value is invalid; the message is meant for the user as is."""


# The one id rule (run ids, study ids): ids become folder and file names, so nothing else gets in.
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,95}$")


def validate_id(value: Any, what: str = "run id") -> str:
    """`value` if it is a safe id (letters, digits, '-' and '_', at most 96), else ConfigError."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ConfigError(f"invalid {what} {value!r}: letters, digits, '-' and '_' only")
    return value


def reject_unknown(given: Iterable, allowed: Iterable, where: str, what: str = "parameter(s)") -> None:
    """ConfigError naming the keys of `given` that are not in `allowed` (and what is allowed)."""
    allowed = list(allowed)
    unknown = sorted(set(map(str, given)) - set(map(str, allowed)))
    if unknown:
        listed = ", ".join(sorted(map(str, allowed))) or "none"
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}unknown {what} {', '.join(unknown)} (allowed: {listed})")


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    kind: "int" | "float" | "bool" | "choice" | "str" | "float_pair"
    low/high: inclusive bounds for int, float and each element of float_pair.
    log: a hint for UIs (log-scale slider / number input).
    """

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    help: str = ""
    log: bool = False

    def __post_init__(self):
        if self.kind not in ("int", "float", "bool", "choice", "str", "float_pair"):
            raise ValueError(f"unknown param kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"choice param {self.name} needs choices")

    def validate(self, value: Any, where: str = "") -> Any:
        """Return the value coerced to the declared type, or raise ConfigError."""
        label = f"{where}.{self.name}" if where else self.name
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ConfigError(f"{label}: expected true or false, got {value!r}")
        if self.kind == "choice":
            if value not in self.choices:
                opts = ", ".join(map(str, self.choices))
                raise ConfigError(f"{label}: {value!r} is not one of: {opts}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{label}: expected text, got {value!r}")
            return value
        if self.kind == "float_pair":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"{label}: expected two numbers [low, high], got {value!r}")
            pair = tuple(self._number(v, float, label) for v in value)
            if pair[0] > pair[1]:
                raise ConfigError(f"{label}: low {pair[0]} is greater than high {pair[1]}")
            return pair
        return self._number(value, int if self.kind == "int" else float, label)

    def _number(self, value: Any, typ: type, label: str):
        if isinstance(value, bool):
            raise ConfigError(f"{label}: expected a number, got {value!r}")
        try:
            if typ is int:
                number = int(value)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                if isinstance(value, str) and str(number) != value.strip():
                    raise ValueError
            else:
                number = float(value)
        except (TypeError, ValueError):
            kind = "a whole number" if typ is int else "a number"
            raise ConfigError(f"{label}: expected {kind}, got {value!r}") from None
        if typ is float and not math.isfinite(number):
            raise ConfigError(f"{label}: must be finite, got {value!r}")
        if self.low is not None and number < self.low:
            raise ConfigError(f"{label}: {number} is below the minimum {self.low}")
        if self.high is not None and number > self.high:
            raise ConfigError(f"{label}: {number} is above the maximum {self.high}")
        return number

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "default": self.default, "low": self.low,
                "high": self.high, "choices": list(self.choices), "help": self.help, "log": self.log}


@dataclass
class Entry:
    name: str
    fn: Callable
    params: tuple[Param, ...] = ()
    description: str = ""
    tags: tuple[str, ...] = ()

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def validate(self, values: dict | None) -> dict:
        """Fill defaults, coerce types, reject unknown names. Returns a new dict."""
        values = dict(values or {})
        reject_unknown(values, (p.name for p in self.params), self.name)
        return {p.name: p.validate(values.get(p.name, p.default), self.name) for p in self.params}


@dataclass
class Registry:
    """Name -> Entry. `register` is used as a decorator next to the function it declares."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)

    def register(self, name: str, params: tuple[Param, ...] | list[Param] = (),
                 description: str = "", tags: tuple[str, ...] = ()):
        def decorator(fn: Callable) -> Callable:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = description or (fn.__doc__ or "").strip().split("\n")[0]
            self.entries[name] = Entry(name, fn, tuple(params), doc, tuple(tags))
            return fn
        return decorator

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            opts = ", ".join(self.entries)
            raise ConfigError(f"unknown {self.kind} {name!r} (choose from: {opts})") from None

    def validate(self, name: str, values: dict | None) -> dict:
        return self.get(name).validate(values)

    def build(self, name: str, values: dict | None = None, **extra):
        entry = self.get(name)
        return entry.fn(**entry.validate(values), **extra)

    def describe(self) -> list[dict]:
        """JSON-able declarations, for UIs and docs."""
        return [{"name": e.name, "description": e.description, "tags": list(e.tags),
                 "params": [p.to_dict() for p in e.params]} for e in self.entries.values()]
