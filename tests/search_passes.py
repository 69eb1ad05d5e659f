"""Passes used by the search tests: a slow one, a lossy one, a broken one and a GPU-only one.

They live in a module of their own so that worker processes started by a test can import them
and build the same search space as the test.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from codesign.config import Config, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance
from codesign.passes.manager import Knob, Pass, PassResult


@register_config
@dataclasses.dataclass(frozen=True)
class SlowConfig(Config):
    seconds: float = 0.4
    tag: int = 0  # every tag is a distinct config, so the evaluator's cache never hides the sleep


class SlowPass(Pass):
    """Stands in for an expensive compile step: sleeps, changes nothing."""

    name = "test_slow"
    config_class = SlowConfig

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (Knob("tag", "int", 0, low=0, high=1_000_000),)

    def apply(self, program: Program, target: Target) -> PassResult:
        time.sleep(self.config.seconds)  # type: ignore[attr-defined]
        return PassResult(program, False)


@register_config
@dataclasses.dataclass(frozen=True)
class LossyConfig(Config):
    scale: float = 0.0
    lossy: bool = False


class LossyPass(Pass):
    """Scales the last parameter by (1 + scale) when ``lossy``: a quality-for-nothing trade."""

    name = "test_lossy"
    config_class = LossyConfig
    tolerance: ClassVar[Tolerance] = Tolerance(rtol=1e9, atol=1e9)

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (
            Knob("lossy", "bool", False),
            Knob("scale", "float", 0.0, low=0.0, high=1.0, step=0.1, when=("lossy", (True,))),
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        if not cfg.lossy or cfg.scale == 0:  # type: ignore[attr-defined]
            return PassResult(program, False)
        name, param = list(program.graph_module.named_parameters())[-1]
        with torch.no_grad():
            param.mul_(1 + cfg.scale)  # type: ignore[attr-defined]
        return PassResult(program, True, {"scaled": name})


@register_config
@dataclasses.dataclass(frozen=True)
class BrokenConfig(Config):
    explode: bool = False


class BrokenPass(Pass):
    name = "test_broken"
    config_class = BrokenConfig

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (Knob("explode", "bool", False),)

    def apply(self, program: Program, target: Target) -> PassResult:
        if self.config.explode:  # type: ignore[attr-defined]
            raise RuntimeError("test_broken exploded on purpose")
        return PassResult(program, False)


@register_config
@dataclasses.dataclass(frozen=True)
class GpuOnlyConfig(Config):
    level: int = 1


class GpuOnlyPass(Pass):
    name = "test_gpu_only"
    config_class = GpuOnlyConfig

    @classmethod
    def knobs(cls) -> tuple[Knob, ...]:
        return (Knob("level", "int", 1, low=1, high=3),)

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        return (
            None
            if target.hardware.kind == "gpu"
            else f"needs a GPU, {target.name} is a {target.hardware.kind}"
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        return PassResult(program, False)
