"""codesign: compiler-style model-hardware co-design for large ranking models.

capture → Program → passes → backend → variant → bundle. The public API is this module's ``__all__``.
"""

from __future__ import annotations

from codesign.capture import capture
from codesign.errors import CodesignError
from codesign.program import Program
from codesign.request import RequestBatch, RequestSpec, StructuredBatch, offsets_from_counts
from codesign.workload import Workload, load_model_ref

__version__ = "0.1.0"

__all__ = [
    "CodesignError",
    "Program",
    "RequestBatch",
    "RequestSpec",
    "StructuredBatch",
    "Workload",
    "__version__",
    "capture",
    "load_model_ref",
    "offsets_from_counts",
]
