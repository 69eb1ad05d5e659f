"""AOTInductor backend: ahead-of-time compiled ``.pt2`` package, loadable without the model's source.

The package holds generated C++/CUDA code compiled into a shared library; the weights are not in it but
in the bundle's ``program.pt2`` (every bundle holds it), handed to the compiled model by name when it
loads, so a bundle stores them once. It is tied to the torch version that built it, which the bundle
manifest records and checks.
``torch._inductor`` (about 2 s to import, torch._dynamo with it) is imported by ``lower`` and
``load``, not by this module, so importing codesign does not pay for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from codesign.backends.base import Backend, Lowered
from codesign.config import Config, knob, register_config
from codesign.errors import BackendError
from codesign.hardware.target import Target
from codesign.ir.program import Program

__all__ = ["AOTI_MODES", "AOTI_PACKAGE", "AotiBackend", "AotiConfig"]

AOTI_PACKAGE = "aoti_package.pt2"
# Inductor modes that mean something ahead of time (CUDA graphs are a runtime matter)
AOTI_MODES = ("default", "max-autotune-no-cudagraphs")


@register_config
@dataclasses.dataclass(frozen=True)
class AotiConfig(Config):
    mode: str = knob(
        "default",
        choices=AOTI_MODES,
        help="Inductor mode the package is compiled in: max-autotune-no-cudagraphs times GEMM/bmm "
        "kernel choices (Inductor's C++ micro-GEMM templates among them) while compiling: a slower "
        "compile, faster small GEMMs",
    )
    decompose_ops: bool = knob(
        True,
        help="compile codesign's ops in aten form (codesign.ops.decompositions) so Inductor fuses "
        "around them; off, they are extern kernels",
    )


class AotiBackend(Backend[AotiConfig]):
    name = "aoti"
    native_artifacts = True  # the package's shared library runs its constructors when it is opened
    config_class = AotiConfig

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        exported = program.export()
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / AOTI_PACKAGE
        from torch._inductor import aoti_compile_and_package, aoti_load_package, list_mode_options

        # a mode is a set of Inductor options, spelled out (aoti_compile_and_package takes options)
        options = {**list_mode_options(self.config.mode), **WEIGHTS_OUTSIDE}
        options.pop("triton.cudagraphs", None)
        try:
            compiled = exported
            if self.config.decompose_ops:
                from codesign.ops.decompositions import decompose_exported

                compiled = decompose_exported(exported)
            with torch.no_grad():
                # the weights stay in program.pt2 (which every bundle holds) and are handed to the
                # compiled model at load: a bundle stores them once
                aoti_compile_and_package(compiled, package_path=str(path), inductor_configs=options)
                runner = aoti_load_package(str(path))
                if not _constants_from(exported, runner):  # a constant the program lacks: keep them inside
                    inside = {k: v for k, v in options.items() if k not in WEIGHTS_OUTSIDE}
                    aoti_compile_and_package(compiled, package_path=str(path), inductor_configs=inside)
                    runner = aoti_load_package(str(path))
        except Exception as exc:
            raise BackendError(
                f"AOTInductor could not compile '{program.name}': {type(exc).__name__}: {str(exc)[:500]}",
                fix="check that a C++ compiler is installed (gcc/g++) or use backend 'eager'/'inductor'",
            ) from exc
        return Lowered(runner=runner, exported=exported, artifacts={AOTI_PACKAGE: path})

    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        if AOTI_PACKAGE not in files:
            raise BackendError(f"the bundle has no {AOTI_PACKAGE}", fix="recompile with backend 'aoti'")
        from torch._inductor import aoti_load_package

        runner = aoti_load_package(str(files[AOTI_PACKAGE]))
        # False: the package needs a constant the program lacks, so lower() compiled it with its own
        # weights inside (and the reference check of codesign.load proves it scores)
        _constants_from(exported, runner)
        return runner  # type: ignore[no-any-return]  # untyped in torch

    def runs_program_weights(self, exported: torch.export.ExportedProgram, runner: Any) -> bool:
        """False where lower() had to keep the weights inside the package (a constant the program lacks)."""
        return set(runner.get_constant_fqns()) <= set(_program_constants(exported))


# Inductor settings of the package: no weights in the shared library (program.pt2 holds them).
WEIGHTS_OUTSIDE = {"aot_inductor.package_constants_in_so": False}


def _constants_from(exported: torch.export.ExportedProgram, runner: Any) -> bool:
    """Hand the compiled model the program's weights and buffers (by name, not copied); False if it
    needs one the program lacks. Packages that carry their own weights get the same values again."""
    source = _program_constants(exported)
    names = list(runner.get_constant_fqns())
    if any(n not in source for n in names):
        return False
    if names:
        runner.load_constants({n: source[n] for n in names}, check_full_update=True, user_managed=True)
    return True


def _program_constants(exported: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The program's weights and buffers by name."""
    return {
        name: t
        for name, t in {**exported.state_dict, **exported.constants}.items()
        if isinstance(t, torch.Tensor)
    }
