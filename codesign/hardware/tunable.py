"""What passes and backends share: a typed config of knobs, availability per target, and a stable uuid.

It sits in the hardware layer because availability is a question about a ``Target``.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar, Generic, TypeVar, cast

from codesign.config import Config, Knob
from codesign.errors import ConfigError
from codesign.hardware.target import Target

__all__ = ["Tunable"]

C = TypeVar("C", bound=Config)


class Tunable(Generic[C]):
    """Shared by passes and backends: a typed config of knobs (checked by the config itself), and a stable uuid."""

    name: ClassVar[str]
    config_class: ClassVar[type[Config]]
    version: ClassVar[int] = 1

    def __init__(self, config: C | None = None) -> None:
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise ConfigError(
                f"{self.name} takes a {self.config_class.__name__}, got {type(cfg).__name__}",
                fix=f"build it as {self.config_class.__name__}(...)",
            )
        self.config: C = cast(C, cfg)

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        """The knobs search may tune: those its config declares with ``knob(...)``."""
        return cls.config_class.knobs()

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        """Why this pass or backend cannot be used for ``target`` (None when it can).

        The manager skips an unavailable pass with a typed ``UNAVAILABLE`` reason; search leaves unavailable
        ones (and their knobs) out of the space for that target.
        """
        return None

    def uuid(self) -> str:
        """Stable id of this code version and config, for cache keys."""
        raw = f"{type(self).__module__}.{type(self).__qualname__}:v{self.version}:{self.config.to_json()}"
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
