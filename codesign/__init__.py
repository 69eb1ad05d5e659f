"""codesign: compiler-style model-hardware co-design for large ranking models.

capture → Program → passes → backend → variant → bundle. The public API is this module's ``__all__``.
"""

from __future__ import annotations

from codesign.build.bundle import load
from codesign.build.variant import Variant, compile
from codesign.errors import CodesignError
from codesign.hardware.target import HardwareSpec, Target, get_target
from codesign.ir.capture import capture
from codesign.ir.program import Program
from codesign.ir.request import RequestBatch, RequestSpec, StructuredBatch, offsets_from_counts
from codesign.ir.workload import Workload, load_model_ref
from codesign.search import ObjectiveSettings, SearchResult, tune
from codesign.serving.deployment import Bundle, load_bundle
from codesign.version import __version__

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
    "Workload",
    "__version__",
    "capture",
    "compile",
    "get_target",
    "load",
    "load_bundle",
    "load_model_ref",
    "offsets_from_counts",
    "tune",
]
