"""TensorRT backend: torch_tensorrt's dynamo path, engines serialized into the bundle.

NVIDIA GPUs only, and only with the ``tensorrt`` extra (torch-tensorrt, which needs CUDA) installed;
anywhere else ``lower`` says which of the two is missing. The exported program is compiled with
a shape range for the candidate dimension (``min``/``opt``/``max`` from the config); ops TensorRT
cannot convert -- codesign's custom ops among them -- stay in PyTorch between TensorRT engines
(torch_tensorrt's partitioner). The result is saved as an ExportedProgram holding the engines.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.utils._pytree as pytree

from codesign.backends.base import Backend, Lowered
from codesign.config import Config, knob, register_config
from codesign.errors import BackendError
from codesign.hardware.target import Target
from codesign.ir.program import Program

__all__ = ["TENSORRT_PROGRAM", "TensorRTBackend", "TensorRTConfig", "import_torch_tensorrt"]

TENSORRT_PROGRAM = "tensorrt_program.ep"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@register_config
@dataclasses.dataclass(frozen=True)
class TensorRTConfig(Config):
    precision: str = knob("fp32", choices=tuple(PRECISIONS), help="lowest layer precision")
    min_block_size: int = knob(3, low=1, high=64, help="fewest ops per TensorRT engine")
    optimization_level: int = knob(3, low=0, high=5, help="TensorRT builder optimization level")
    opt_candidates: int = knob(
        256, low=1, high=1 << 20, log=True, help="candidate count engines are tuned for"
    )
    max_candidates: int = knob(4096, low=1, high=1 << 20, log=True, help="largest candidate count")


def import_torch_tensorrt() -> ModuleType:
    """torch_tensorrt, or a BackendError that says how to get it."""
    try:
        return importlib.import_module("torch_tensorrt")
    except ImportError as exc:
        raise BackendError(
            f"backend 'tensorrt' needs torch-tensorrt, which is not importable here ({exc})",
            fix="on a machine with an NVIDIA GPU and CUDA: pip install 'codesign[tensorrt]'; "
            "elsewhere use backend 'aoti' or 'inductor'",
        ) from exc


class TensorRTBackend(Backend[TensorRTConfig]):
    name = "tensorrt"
    native_artifacts = True  # a serialized engine (and any plugin library it names)
    takes_new_weights = False  # the engine holds its weights
    config_class = TensorRTConfig
    device_kinds = ("gpu",)
    vendors = ("NVIDIA",)

    def lower(self, program: Program, target: Target, workdir: Path) -> Lowered:
        self.check_target(target)
        trt = import_torch_tensorrt()
        cfg = self.config
        if not 1 <= cfg.opt_candidates <= cfg.max_candidates:
            raise BackendError(
                f"tensorrt: opt_candidates={cfg.opt_candidates} must lie in [1, max_candidates={cfg.max_candidates}]"
            )
        device = torch.device("cuda")
        on_gpu = program.copy()
        on_gpu.graph_module.to(device)
        on_gpu = dataclasses.replace(on_gpu, example=on_gpu.example.to(device))
        exported = on_gpu.export()
        example = on_gpu.call_inputs(on_gpu.example)
        ranges = _input_ranges(exported, example, cfg, trt)
        options: dict[str, Any] = {
            "min_block_size": cfg.min_block_size,
            "optimization_level": cfg.optimization_level,
        }
        if cfg.precision != "fp32":
            options.update(enabled_precisions={PRECISIONS[cfg.precision]}, use_explicit_typing=False)
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / TENSORRT_PROGRAM
        try:
            with torch.no_grad():
                compiled = trt.dynamo.compile(exported, arg_inputs=(), kwarg_inputs=ranges, **options)
                trt.save(
                    compiled, str(path), output_format="exported_program", arg_inputs=(), kwarg_inputs=example
                )
        except Exception as exc:
            raise BackendError(
                f"TensorRT could not compile '{program.name}': {type(exc).__name__}: {str(exc)[:500]}",
                fix="try precision 'fp32', a larger min_block_size, or backend 'aoti'",
            ) from exc
        return Lowered(
            runner=self.load(exported, {TENSORRT_PROGRAM: path}),
            exported=exported,
            artifacts={TENSORRT_PROGRAM: path},
        )

    def load(
        self,
        exported: torch.export.ExportedProgram,
        files: Mapping[str, Path],
        example: Mapping[str, Any] | None = None,
    ) -> Callable[..., Any]:
        import_torch_tensorrt()  # registers the engine class the saved program refers to
        if TENSORRT_PROGRAM not in files:
            raise BackendError(
                f"the bundle has no {TENSORRT_PROGRAM}", fix="recompile with backend 'tensorrt'"
            )
        module = torch.export.load(str(files[TENSORRT_PROGRAM])).module()
        return _on_device(module, torch.device("cuda"))


def _input_ranges(
    exported: torch.export.ExportedProgram, example: Mapping[str, Any], cfg: TensorRTConfig, trt: ModuleType
) -> dict[str, Any]:
    """torch_tensorrt.Input per input leaf: dynamic dims span [min, opt, max], static dims are fixed."""
    names = set(exported.graph_signature.user_inputs)
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder" and n.name in names]
    leaves, spec = pytree.tree_flatten(dict(example))
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if len(tensors) != len(placeholders):
        raise BackendError(
            f"tensorrt: the exported program has {len(placeholders)} inputs, the example {len(tensors)} tensors"
        )
    rows = _rows(example)
    out: list[Any] = []
    user_inputs = iter(placeholders)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            out.append(leaf)
            continue
        val = next(user_inputs).meta["val"]
        lo, opt, hi = [], [], []
        for d, real in zip(val.shape, leaf.shape, strict=True):
            if isinstance(d, torch.SymInt):
                scale = max(1, real // rows)  # jagged inputs: ids per candidate in the example
                lo.append(1)
                opt.append(cfg.opt_candidates * scale)
                hi.append(cfg.max_candidates * scale)
            else:
                lo.append(int(d))
                opt.append(int(d))
                hi.append(int(d))
        out.append(trt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=leaf.dtype))
    return pytree.tree_unflatten(out, spec)  # type: ignore[no-any-return]  # pytree is typed as returning Any


def _rows(example: Mapping[str, Any]) -> int:
    """Candidate count of the example (the first dim most inputs share)."""
    firsts = [
        t.shape[0] for t in pytree.tree_leaves(dict(example)) if isinstance(t, torch.Tensor) and t.dim()
    ]
    return max(1, min(firsts)) if firsts else 1


def _on_device(module: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """A runner that moves inputs to the engine's device and outputs back to the caller's."""

    def run(**inputs: Any) -> Any:
        src = next((t.device for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)), device)
        moved = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)
        return pytree.tree_map(lambda t: t.to(src) if isinstance(t, torch.Tensor) else t, module(**moved))

    return run
