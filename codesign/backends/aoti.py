"""AOTInductor backend: ahead-of-time compiled ``.pt2`` package, loadable without the model's source.

The package holds generated C++/CUDA code compiled into a shared library plus the weights; it is
tied to the torch version that built it, which the bundle manifest records and checks.
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

__all__ = ["AOTI_PACKAGE", "AotiBackend", "AotiConfig"]

AOTI_PACKAGE = "aoti_package.pt2"


@register_config
@dataclasses.dataclass(frozen=True)
class AotiConfig(Config):
    decompose_ops: bool = knob(
        True,
        help="compile codesign's ops in aten form (codesign.ops.decompositions) so Inductor fuses "
        "around them; off, they are extern kernels",
    )


class AotiBackend(Backend[AotiConfig]):
    name = "aoti"
    config_class = AotiConfig

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        exported = program.export()
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / AOTI_PACKAGE
        from torch._inductor import aoti_compile_and_package

        try:
            compiled = exported
            if self.config.decompose_ops:
                from codesign.ops.decompositions import decompose_exported

                compiled = decompose_exported(exported)
            with torch.no_grad():
                aoti_compile_and_package(compiled, package_path=str(path))
        except Exception as exc:
            raise BackendError(
                f"AOTInductor could not compile '{program.name}': {type(exc).__name__}: {str(exc)[:500]}",
                fix="check that a C++ compiler is installed (gcc/g++) or use backend 'eager'/'inductor'",
            ) from exc
        return Lowered(
            runner=self.load(exported, {AOTI_PACKAGE: path}),
            exported=exported,
            artifacts={AOTI_PACKAGE: path},
        )

    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        if AOTI_PACKAGE not in files:
            raise BackendError(f"the bundle has no {AOTI_PACKAGE}", fix="recompile with backend 'aoti'")
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(files[AOTI_PACKAGE]))  # type: ignore[no-any-return]  # untyped in torch
