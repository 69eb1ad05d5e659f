"""Ranking quality of a variant against the captured model: normalized entropy (NE) change.

NE is the log loss of the predicted click probabilities divided by the entropy of the average
click rate; lower is better, and ranking teams read changes of 0.1% as significant. Synthetic
requests have no clicks, so the labels are drawn from the *reference* model's own probabilities
(``y ~ Bernoulli(sigmoid(reference logit))``, seeded): the reference is then calibrated by
construction, and any change a rewrite makes to the logits shows up as an NE change. This measures
fidelity to the reference, not real-world quality.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from codesign.errors import NumericsError
from codesign.numerics import output_tensors

__all__ = [
    "QUALITY_DECIMALS",
    "QualityLoss",
    "draw_labels",
    "join_heads",
    "normalized_entropy",
    "quality_loss",
]

# NE changes below 1e-4 % come from fp32 reordering (Inductor, fused GEMMs); they are reported as 0
# so that search does not treat rounding noise as a quality trade-off.
QUALITY_DECIMALS = 4
_EPS = 1e-7


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Log loss of ``sigmoid(logits)`` against 0/1 ``labels``, over the entropy of the mean label."""
    x = logits.detach().cpu().double().reshape(-1)
    y = labels.detach().cpu().double().reshape(-1)
    if x.numel() != y.numel() or x.numel() == 0:
        raise NumericsError(f"NE needs as many labels as logits, got {y.numel()} labels for {x.numel()}")
    log_loss = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    p = float(y.mean().clamp(_EPS, 1 - _EPS))
    base = -(p * torch.log(torch.tensor(p)) + (1 - p) * torch.log(torch.tensor(1 - p)))
    return float(log_loss / base)


def draw_labels(reference_logits: torch.Tensor, seed: int) -> torch.Tensor:
    """0/1 labels drawn from the reference model's click probabilities (seeded)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.sigmoid(reference_logits.detach().cpu().double().reshape(-1))
    return torch.bernoulli(probs, generator=g)


@dataclasses.dataclass(frozen=True)
class QualityLoss:
    """NE of the reference and of the variant per output head, and the worst relative change."""

    ne_reference: tuple[float, ...]
    ne: tuple[float, ...]
    loss_pct: float  # max over heads of |NE - NE_ref| / NE_ref * 100, rounded to QUALITY_DECIMALS
    max_abs_error: float  # largest logit difference

    @property
    def exact_pct(self) -> float:
        """The worst relative NE change in percent, not rounded (for budgets down to zero)."""
        return max(
            abs(n - nr) / max(nr, _EPS) * 100 for n, nr in zip(self.ne, self.ne_reference, strict=True)
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def join_heads(outputs: Sequence[Any]) -> list[torch.Tensor]:
    """Each output head over several calibration batches, joined along the candidate rows."""
    per_batch = [output_tensors(o) for o in outputs]
    return [torch.cat([b[h] for b in per_batch]) for h in range(len(per_batch[0]))]


def quality_loss(
    reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], seed: int = 0
) -> QualityLoss:
    """Compare output heads (logits, one tensor per head) with the reference heads.

    Non-floating outputs (ids, masks) are skipped; a model without a floating output is refused.
    """
    if len(reference) != len(outputs):
        raise NumericsError(f"variant returns {len(outputs)} outputs, the reference {len(reference)}")
    ne_ref: list[float] = []
    ne: list[float] = []
    max_abs = 0.0
    for i, (r, o) in enumerate(zip(reference, outputs, strict=True)):
        if not r.is_floating_point():
            continue
        if r.shape != o.shape:
            raise NumericsError(f"output {i} has shape {tuple(o.shape)}, the reference {tuple(r.shape)}")
        labels = draw_labels(r, seed + i)
        ne_ref.append(normalized_entropy(r, labels))
        ne.append(normalized_entropy(o, labels))
        if r.numel():
            max_abs = max(max_abs, float((o.detach().cpu().double() - r.detach().cpu().double()).abs().max()))
    if not ne_ref:
        raise NumericsError(
            "the model has no floating-point output to measure quality on",
            fix="quality is the NE change of logit outputs; return logits from the model",
        )
    loss = QualityLoss(tuple(ne_ref), tuple(ne), 0.0, max_abs)
    return dataclasses.replace(loss, loss_pct=round(loss.exact_pct, QUALITY_DECIMALS))
