"""codesign: compiler-style model-hardware co-design for large ranking models.

capture → Program → passes → backend → variant → bundle. The public API is this module's ``__all__``.
"""

from __future__ import annotations

from codesign.bundle import Bundle, load, load_bundle
from codesign.capture import capture
from codesign.errors import CodesignError
from codesign.program import Program
from codesign.request import RequestBatch, RequestSpec, StructuredBatch, offsets_from_counts
from codesign.search import ObjectiveSettings, SearchResult, tune
from codesign.target import HardwareSpec, Target, get_target
from codesign.variant import Variant, compile
from codesign.workload import Workload, load_model_ref

__version__ = "0.1.0"

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
