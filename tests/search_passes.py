"""Passes used by the search tests: a slow one, a lossy one, a broken one and a GPU-only one.

They live in a module of their own so that worker processes started by a test can import them
and build the same search space as the test.
"""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch

from codesign.config import Config, knob, register_config
from codesign.hardware.target import Target
from codesign.ir.program import Program
from codesign.numerics import Tolerance
from codesign.passes.manager import Pass, PassResult


@register_config
@dataclasses.dataclass(frozen=True)
class SlowConfig(Config):
    seconds: float = 0.4
    # every tag is a distinct config, so the evaluator's cache never hides the sleep
    tag: int = knob(0, low=0, high=1_000_000, help="distinguishes otherwise equal configs")


class SlowPass(Pass):
    """Stands in for an expensive compile step: sleeps, changes nothing."""

    name = "test_slow"
    config_class = SlowConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        time.sleep(self.config.seconds)  # type: ignore[attr-defined]
        return PassResult(program, False)


@register_config
@dataclasses.dataclass(frozen=True)
class LossyConfig(Config):
    lossy: bool = knob(False, help="damage the last parameter")
    scale: float = knob(0.0, low=0.0, high=1.0, step=0.1, when=("lossy", (True,)), help="how much damage")


class LossyPass(Pass):
    """Scales the last parameter by (1 + scale) when ``lossy``: a quality-for-nothing trade."""

    name = "test_lossy"
    config_class = LossyConfig
    tolerance: ClassVar[Tolerance] = Tolerance(rtol=1e9, atol=1e9)

    def apply(self, program: Program, target: Target) -> PassResult:
        cfg = self.config
        if not cfg.lossy or cfg.scale == 0:  # type: ignore[attr-defined]
            return PassResult(program, False)
        # a new tensor, not an in-place change: the program shares its parameters with the pass's input
        gm = program.graph_module
        name, param = list(gm.named_parameters())[-1]
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        scaled = param.detach() * (1 + cfg.scale)  # type: ignore[attr-defined]
        setattr(owner, leaf, torch.nn.Parameter(scaled, requires_grad=False))
        return PassResult(program, True, {"scaled": name})


@register_config
@dataclasses.dataclass(frozen=True)
class BrokenConfig(Config):
    explode: bool = knob(False, help="raise in apply")


class BrokenPass(Pass):
    name = "test_broken"
    config_class = BrokenConfig

    def apply(self, program: Program, target: Target) -> PassResult:
        if self.config.explode:  # type: ignore[attr-defined]
            raise RuntimeError("test_broken exploded on purpose")
        return PassResult(program, False)


@register_config
@dataclasses.dataclass(frozen=True)
class GpuOnlyConfig(Config):
    level: int = knob(1, low=1, high=3, help="an unused level")


class GpuOnlyPass(Pass):
    name = "test_gpu_only"
    config_class = GpuOnlyConfig

    @classmethod
    def unavailable(cls, target: Target) -> str | None:
        return (
            None
            if target.hardware.kind == "gpu"
            else f"needs a GPU, {target.name} is a {target.hardware.kind}"
        )

    def apply(self, program: Program, target: Target) -> PassResult:
        return PassResult(program, False)
