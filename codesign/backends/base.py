"""Backend protocol: ``lower(program, target) -> Lowered`` and ``load(files) -> runner``.

A backend declares which targets it runs on, has a stable ``uuid()`` for cache keys, and names the
files it writes into a bundle so that a bundle can be reloaded without the model's source.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from codesign.config import Config, register_config
from codesign.errors import BackendError
from codesign.hardware.target import Target
from codesign.hardware.tunable import Tunable
from codesign.ir.program import Program

__all__ = ["Backend", "BackendConfig", "Lowered"]

C = TypeVar("C", bound=Config)


@register_config
@dataclasses.dataclass(frozen=True)
class BackendConfig(Config):
    """Backends without options use this empty config."""


@dataclasses.dataclass
class Lowered:
    """A lowered program: a callable taking the model's keyword inputs, and the artifacts behind it."""

    runner: Callable[..., Any]
    exported: torch.export.ExportedProgram
    artifacts: dict[str, Path] = dataclasses.field(default_factory=dict)  # bundle-relative name -> file


class Backend(Tunable[C], abc.ABC):
    """Base of every backend. Subclasses set ``name`` (and ``config_class`` when they have options)."""

    config_class: ClassVar[type[Config]] = BackendConfig
    # which targets the backend can ever lower for: hardware kinds and, if set, vendors
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu", "gpu")
    # its bundle artifacts are native code (a shared library, an engine): loaded only from trusted bundles
    native_artifacts: ClassVar[bool] = False
    vendors: ClassVar[tuple[str, ...] | None] = None
    # load() builds its runner from the ExportedProgram it is given, weights included (False: the
    # artifacts hold weights of their own, so a weight update needs a new bundle)
    takes_new_weights: ClassVar[bool] = True

    def runs_program_weights(
        self, exported: torch.export.ExportedProgram, runner: Callable[..., Any]
    ) -> bool:
        """Whether ``runner`` (built by ``load`` from ``exported``) computes with ``exported``'s weights."""
        return self.takes_new_weights

    def supports(self, target: Target) -> bool:
        """True when this backend can lower for ``target`` on a machine that has it."""
        return self.unavailable(target) is None

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        hw = target.hardware
        if hw.kind in cls.device_kinds and (cls.vendors is None or hw.vendor in cls.vendors):
            return None
        vendors = f" from {', '.join(cls.vendors)}" if cls.vendors else ""
        return f"runs on {'/'.join(cls.device_kinds)} devices{vendors}, not {hw.vendor} {hw.kind}"

    def runs_on(self, target: Target) -> bool:
        """True when this backend can execute on ``target`` from this machine."""
        return self.supports(target) and target.runs_here

    def check_target(self, target: Target) -> None:
        if not self.supports(target):
            kinds = "/".join(self.device_kinds)
            vendors = f" from {', '.join(self.vendors)}" if self.vendors else ""
            raise BackendError(
                f"backend '{self.name}' does not support target '{target.name}' "
                f"({target.hardware.vendor} {target.hardware.kind}); it runs on {kinds} devices{vendors}",
                fix="choose another backend ('codesign targets' lists which backend supports which target)",
            )
        if not self.runs_on(target):
            raise BackendError(
                f"backend '{self.name}' cannot run on target '{target.name}' from this machine",
                fix="compile for target 'host' here, or plan for this target with the cost model "
                "(codesign profile) and lower on a machine that has it",
            )

    @abc.abstractmethod
    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        """Make ``program`` runnable on ``target``; artifacts go under ``workdir``."""

    @abc.abstractmethod
    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        """Rebuild the runner from a bundle's exported program and verified artifact files.

        ``example`` (the reference batch's keyword inputs) lets a backend check a faster form of the
        runner against the plain one before it uses it.
        """
