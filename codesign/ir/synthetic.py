"""Building blocks for synthetic ranking requests: Zipf-distributed ids and per-request repetition.

Real ranking traffic has heavy-tailed id popularity (a few items, users and categories take most
lookups); uniform ids would make embedding caches and the cost model look wrong. Request-level
features are drawn once per request and repeated on each of its candidate rows, which is how flat
CTR models receive them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codesign.ir.request import offsets_from_counts

__all__ = ["jagged_ids", "per_request", "repeat_bags", "zipf_ids"]

# A Zipf exponent slightly above 1 is the usual fit for item/user popularity in recommendation logs.
DEFAULT_ZIPF_ALPHA = 1.05


def zipf_ids(
    num_rows: int,
    shape: Sequence[int] | int,
    *,
    generator: torch.Generator,
    alpha: float = DEFAULT_ZIPF_ALPHA,
    low: int = 0,
) -> torch.Tensor:
    """Ids in ``[low, num_rows)`` with P(rank k) ∝ k^-alpha, hot ids scattered over the table.

    Sampled by inverting the continuous power-law CDF (exact enough, O(1) per id even for 40M-row
    tables); a multiplicative hash spreads the popular ranks instead of clustering them at id 0.
    """
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    span = num_rows - low
    if span < 1:
        raise ValueError(f"zipf_ids: need num_rows > low, got num_rows={num_rows}, low={low}")
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    if abs(alpha - 1.0) < 1e-9:
        rank = torch.exp(u * torch.log(torch.tensor(span + 1.0)))
    else:
        e = 1.0 - alpha
        rank = ((float(span + 1) ** e - 1.0) * u + 1.0) ** (1.0 / e)
    rank = (rank.floor().long() - 1).clamp_(0, span - 1)
    scattered = (rank * 2_654_435_761) % span  # Knuth's multiplicative hash
    return scattered + low


def per_request(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Repeat one row per request onto each of the request's candidate rows."""
    return values.repeat_interleave(counts, dim=0)


def jagged_ids(
    num_rows: int, lengths: torch.Tensor, *, generator: torch.Generator, alpha: float = DEFAULT_ZIPF_ALPHA
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag of Zipf ids per entry of ``lengths``: flat values and EmbeddingBag start offsets."""
    values = zipf_ids(num_rows, int(lengths.sum()), generator=generator, alpha=alpha)
    return values, offsets_from_counts(lengths)[:-1]


def repeat_bags(
    values: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat request r's bag (values[starts[r]:starts[r]+lengths[r]]) on its counts[r] candidate rows."""
    starts = offsets_from_counts(lengths)[:-1]
    row_len = lengths.repeat_interleave(counts)
    row_start = starts.repeat_interleave(counts)
    row_off = offsets_from_counts(row_len)
    total = int(row_len.sum())
    row_of_val = torch.repeat_interleave(torch.arange(row_len.numel()), row_len)
    j = torch.arange(total) - row_off[:-1][row_of_val]
    return values[row_start[row_of_val] + j], row_off[:-1]
