"""A zoo of small ranking models written the way practitioners write them, each with its Workload.

Every module holds one ``nn.Module`` in its natural idiom (no codesign inside the model class) and a
``build(seed=0) -> Workload`` whose RequestSpec declares the user-side fields request-level and whose
``make_batch`` repeats them on every candidate row of a request. Sizes are tiny (embedding dim 8-16,
vocabularies up to 1000 rows, MLPs up to 64 wide) so that capturing and compiling all of them is quick.

``dlrm_reference`` is ``dlrm_lists`` with the reference code's pair indices built in ``forward``;
``autoint_mha`` is ``autoint`` with ``nn.MultiheadAttention`` layers (capture copies its transposed
``[fields, batch, d]`` projections' inputs to contiguous layout; request sharing rewrites that region
rows first, codesign.passes.row_layout).

>>> from tests.zoo import ZOO, names
>>> workload = ZOO["dcn_v1"]()
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import codesign
from codesign.ir.program import Program
from codesign.ir.workload import Workload
from tests.zoo import (
    autoint,
    cin,
    dcn_v1,
    dcn_v2,
    deepfm,
    din,
    dlrm_lists,
    fm,
    mmoe,
    nfm,
    pnn,
    wide_deep,
)

__all__ = ["ZOO", "captured", "names"]


def _dlrm_reference(seed: int = 0) -> Workload:
    return dlrm_lists.build(seed, interaction_indices="inline")


def _autoint_mha(seed: int = 0) -> Workload:
    return autoint.build(seed, attention="torch")


ZOO: dict[str, Callable[..., Workload]] = {
    "fm": fm.build,
    "wide_deep": wide_deep.build,
    "deepfm": deepfm.build,
    "dcn_v1": dcn_v1.build,
    "dcn_v2": dcn_v2.build,
    "cin": cin.build,
    "autoint": autoint.build,
    "autoint_mha": _autoint_mha,
    "din": din.build,
    "dlrm_lists": dlrm_lists.build,
    "dlrm_reference": _dlrm_reference,
    "mmoe": mmoe.build,
    "nfm": nfm.build,
    "pnn": pnn.build,
}


def names() -> list[str]:
    """The zoo's model names, in registry order."""
    return list(ZOO)


@functools.cache
def captured(name: str) -> Program:
    """The captured program of one zoo model, captured once per test session (tests must not change it)."""
    return codesign.capture(ZOO[name]())
