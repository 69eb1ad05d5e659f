"""Frozen, versioned config dataclasses that round-trip through JSON.

A config class is registered once (``@register_config``); loading accepts only registered class
names, so a bundle's JSON can never name arbitrary code. ``VERSION`` is bumped when fields change
meaning; loading a config written by a newer version is refused.

A *knob* (a value search may tune) is declared once, on its field, with ``knob(...)``: its type comes
from the annotation, its range, scale and help from the call. Validation (on construction), the search
space, CLI flags and the docs tables all read ``Config.knobs()``.

>>> @register_config
... @dataclasses.dataclass(frozen=True)
... class MyPassConfig(Config):
...     min_rows: int = knob(2, low=1, high=64, help="fewest rows worth the rewrite")
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, TypeVar

from codesign.errors import ConfigError

__all__ = [
    "Config",
    "Knob",
    "config_from_dict",
    "config_from_json",
    "knob",
    "register_config",
    "registered_configs",
]

_REGISTRY: dict[str, type[Config]] = {}

C = TypeVar("C", bound="type[Config]")


_KNOB_KINDS: dict[Any, str] = {bool: "bool", int: "int", float: "float"}


@dataclasses.dataclass(frozen=True)
class Knob:
    """A config value search may tune: its name, kind, default, range, scale and help.

    ``kind`` is ``int``, ``float``, ``bool`` or ``categorical``. ``step`` is the search grid of a float knob
    (values closer than this act alike); ``when`` makes the knob active only while another knob of the same
    config takes one of the given values.
    """

    name: str
    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    doc: str = ""
    step: float | None = None
    when: tuple[str, tuple[Any, ...]] | None = None

    def check(self, value: Any) -> None:
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "categorical": value in self.choices,
        }[self.kind]
        if ok and self.kind in ("int", "float"):
            ok = (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
        if not ok:
            rng = list(self.choices) if self.kind == "categorical" else f"[{self.low}, {self.high}]"
            raise ConfigError(
                f"knob {self.name}={value!r} is not a valid {self.kind} in {rng}",
                fix=f"{self.name}: {self.doc}" if self.doc else "",
            )


@dataclasses.dataclass(frozen=True)
class _KnobSpec:
    low: float | None
    high: float | None
    choices: tuple[Any, ...]
    log: bool
    help: str
    step: float | None
    when: tuple[str, tuple[Any, ...]] | None


def knob(
    default: Any,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] = (),
    log: bool = False,
    step: float | None = None,
    when: tuple[str, tuple[Any, ...]] | None = None,
) -> Any:
    """Declare a config field as a tunable knob (a ``dataclasses.field`` carrying its range and help)."""
    spec = _KnobSpec(low, high, tuple(choices), log, help, step, when)
    return dataclasses.field(default=default, metadata={"knob": spec})


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every knob/config dataclass. Subclasses are frozen dataclasses with JSON-able fields.

    Knob fields (``knob(...)``) are checked against their declared kind and range on construction.
    """

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for k in type(self).knobs():
            k.check(getattr(self, k.name))

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        """The knobs of this config, in field order, built from their ``knob(...)`` declarations."""
        return _knobs_of(cls)

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": type(self).__name__, "version": self.VERSION, "fields": fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self: Any, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)


_KNOBS: dict[type, tuple[Knob, ...]] = {}


def _knobs_of(cls: type[Config]) -> tuple[Knob, ...]:
    if cls in _KNOBS:
        return _KNOBS[cls]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("knob")
        if spec is None:
            continue
        kind = "categorical" if spec.choices else _KNOB_KINDS.get(hints.get(f.name, object))
        if kind is None:
            raise ConfigError(
                f"knob {cls.__name__}.{f.name} has type {hints.get(f.name)!r}",
                fix="declare knobs as bool, int or float fields, or give choices=",
            )
        out.append(
            Knob(
                f.name,
                kind,
                f.default,
                spec.low,
                spec.high,
                spec.choices,
                spec.log,
                spec.help,
                spec.step,
                spec.when,
            )
        )
    _KNOBS[cls] = tuple(out)
    return _KNOBS[cls]


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(
        f"config field value {value!r} of type {type(value).__name__} is not JSON-serializable",
        fix="use bool/int/float/str, tuples, dicts or nested Config objects in config fields",
    )


def register_config(cls: C) -> C:
    """Class decorator: allow ``cls`` to be loaded from JSON by its class name."""
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ConfigError(
            f"two config classes are named {name!r}", fix="give each config class a unique name"
        )
    _REGISTRY[name] = cls
    return cls


def registered_configs() -> dict[str, type[Config]]:
    return dict(_REGISTRY)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from ``Config.to_dict()`` output; only registered classes are accepted."""
    if not isinstance(data, dict) or not {"type", "version", "fields"} <= data.keys():
        raise ConfigError(f"not a config record: {data!r}", fix="pass the output of Config.to_dict()")
    name = data["type"]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"config type {name!r} is not on the allow-list",
            fix=f"known types: {sorted(_REGISTRY)}; register new configs with @register_config",
        )
    if not isinstance(data["version"], int) or data["version"] > cls.VERSION:
        raise ConfigError(
            f"{name} version {data['version']!r} is newer than this codesign's version {cls.VERSION}",
            fix="upgrade codesign to load this config",
        )
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data["fields"]) - known.keys()
    if unknown:
        raise ConfigError(f"{name} has no fields {sorted(unknown)}", fix=f"valid fields: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _from_jsonable(v, hints.get(k)) for k, v in data["fields"].items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build {name} from {data['fields']!r}: {exc}") from exc


def _from_jsonable(value: Any, hint: Any) -> Any:
    if isinstance(value, dict) and {"type", "version", "fields"} <= value.keys():
        return config_from_dict(value)
    if isinstance(value, list):
        value = [
            config_from_dict(v) if isinstance(v, dict) and {"type", "version", "fields"} <= v.keys() else v
            for v in value
        ]
        origin = typing.get_origin(hint)
        return tuple(value) if origin is tuple or hint is None else value
    return value


def config_from_json(text: str) -> Config:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config JSON is malformed: {exc}") from exc
    return config_from_dict(data)
