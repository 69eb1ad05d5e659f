"""codesign: compiler-style model-hardware co-design for large ranking models.

capture → Program → passes → backend → variant → bundle. The public API is this module's ``__all__``.

The names load lazily, on first use: ``import codesign`` (and every ``import codesign.x``, which runs
this file first) stays cheap, so a server that only loads bundles never pays for capture, the
passes, Optuna or torch._inductor. ``TYPE_CHECKING`` imports give type checkers and docs the same
names eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from codesign.errors import CodesignError
from codesign.lazy import lazy_exports
from codesign.version import __version__

if TYPE_CHECKING:
    from codesign.build.bundle import load
    from codesign.build.variant import Variant, compile
    from codesign.build.weights import WeightsDelta, apply_delta, weight_names
    from codesign.hardware.target import HardwareSpec, Target, get_target
    from codesign.ir.capture import capture
    from codesign.ir.program import Program
    from codesign.ir.request import RequestBatch, RequestSpec, StructuredBatch, offsets_from_counts
    from codesign.ir.workload import Workload, load_model_ref
    from codesign.search.objectives import ObjectiveSettings
    from codesign.search.result import SearchResult
    from codesign.search.tuner import tune
    from codesign.serving.deployment import Bundle, load_bundle

__all__ = [
    "Bundle",
    "CodesignError",
    "HardwareSpec",
    "ObjectiveSettings",
    "Program",
    "RequestBatch",
    "RequestSpec",
    "SearchResult",
    "StructuredBatch",
    "Target",
    "Variant",
    "WeightsDelta",
    "Workload",
    "__version__",
    "apply_delta",
    "capture",
    "compile",
    "get_target",
    "load",
    "load_bundle",
    "load_model_ref",
    "offsets_from_counts",
    "tune",
    "weight_names",
]

# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "Bundle": "codesign.serving.deployment",
    "HardwareSpec": "codesign.hardware.target",
    "ObjectiveSettings": "codesign.search.objectives",
    "Program": "codesign.ir.program",
    "RequestBatch": "codesign.ir.request",
    "RequestSpec": "codesign.ir.request",
    "SearchResult": "codesign.search.result",
    "StructuredBatch": "codesign.ir.request",
    "Target": "codesign.hardware.target",
    "Variant": "codesign.build.variant",
    "WeightsDelta": "codesign.build.weights",
    "Workload": "codesign.ir.workload",
    "apply_delta": "codesign.build.weights",
    "capture": "codesign.ir.capture",
    "compile": "codesign.build.variant",
    "get_target": "codesign.hardware.target",
    "load": "codesign.build.bundle",
    "load_bundle": "codesign.serving.deployment",
    "load_model_ref": "codesign.ir.workload",
    "offsets_from_counts": "codesign.ir.request",
    "tune": "codesign.search.tuner",
    "weight_names": "codesign.build.weights",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
