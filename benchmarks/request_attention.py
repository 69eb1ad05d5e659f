"""Target attention after request sharing: SDPA on per-candidate K/V gathers vs ``codesign::request_attention``.

The user history ``h_R`` [R, L, d] is computed once per request. Today's graph gathers it to every
candidate and runs SDPA (``index_select(h_R, 0, request_index)``, unflatten to heads, transpose,
SDPA); the op reads ``h_R`` as it is with the request offsets. Both sides are timed from ``h_R``
(the gather is part of what the op removes; ``request_index`` is precomputed, as the graph shares
it). useq ``small`` shapes by default: H=4, L=64, dh=16, one query per candidate. Timings are
interleaved medians (``codesign.hardware.timing.interleaved_medians``: every round times both sides,
so the machine's drift hits both alike, which a ratio needs). On the host CPU the op's composite
implementation runs; with CUDA, the Triton kernel (``--device cuda``).

    .venv/bin/python benchmarks/request_attention.py [--rounds 15] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import codesign.ops  # noqa: F401  (registers codesign::request_attention)
from codesign.hardware.timing import interleaved_medians
from codesign.ir.request import offsets_from_counts
from codesign.ops.request_attention import use_padding

warnings.filterwarnings("ignore", module=r"torch\..*")

CASES = ((1, 64), (1, 1024), (1, 4096), (16, 1024))  # (requests, candidates)
HEADS, LENGTH, HEAD_DIM = 4, 64, 16
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    rows: list[dict[str, object]] = []
    times: dict[tuple[int, int], tuple[float, float]] = {}  # (R, N) -> (gathered, request_attention)
    header = (
        f"{'R':>3} {'N':>5} {'gathered SDPA':>14} {'request_attention':>18} {'speedup':>8} {'max |diff|':>10}"
    )
    print(header + ("  cpu path" if device.type == "cpu" else ""))
    for requests, n in CASES:
        g = torch.Generator().manual_seed(requests * 7919 + n)
        counts = [n // requests] * requests
        counts[-1] += n - sum(counts)
        offsets = offsets_from_counts(counts).to(device)
        request_index = torch.repeat_interleave(
            torch.arange(requests, device=device), torch.tensor(counts, device=device)
        )
        user = torch.randn(requests, LENGTH, HEADS * HEAD_DIM, generator=g).to(device)  # h_R
        # the candidate query as useq makes it: [N, d] -> [N, H, 1, dh] (a transposed view)
        q = torch.randn(n, 1, HEADS, HEAD_DIM, generator=g).to(device).transpose(1, 2)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)

        def gathered(
            q: torch.Tensor = q, user: torch.Tensor = user, index: torch.Tensor = request_index
        ) -> torch.Tensor:
            kv = heads(user.index_select(0, index))  # [N, H, L, dh]
            out = F.scaled_dot_product_attention(q, kv, kv)
            sync()
            return out

        def fused(
            q: torch.Tensor = q, user: torch.Tensor = user, offsets: torch.Tensor = offsets
        ) -> torch.Tensor:
            kv = heads(user)  # [R, H, L, dh]
            out = torch.ops.codesign.request_attention(q, kv, kv, offsets, None, None)
            sync()
            return out

        with torch.no_grad():
            diff = float((gathered() - fused()).abs().max())
        medians = interleaved_medians(
            {"gathered": gathered, "request_attention": fused}, rounds=args.rounds, calls=3, warmup=2
        )
        t_gather, t_fused = medians["gathered"], medians["request_attention"]
        times[(requests, n)] = (t_gather, t_fused)
        row: dict[str, object] = {
            "requests": requests,
            "candidates": n,
            "heads": HEADS,
            "history": LENGTH,
            "head_dim": HEAD_DIM,
            "gathered_sdpa_s": t_gather,
            "request_attention_s": t_fused,
            "speedup": t_gather / t_fused,
            "max_abs_diff": diff,
        }
        if device.type == "cpu":
            row["cpu_path"] = "padded" if use_padding(counts) else "loop"
        rows.append(row)
        print(
            f"{requests:>3} {n:>5} {t_gather * 1e3:>12.3f}ms {t_fused * 1e3:>16.3f}ms "
            f"{t_gather / t_fused:>7.1f}x {diff:>10.1e}"
            + (f"  {row['cpu_path']}" if "cpu_path" in row else "")
        )
    for i, side in enumerate(("gathered SDPA", "request_attention")):
        growth = times[(1, 4096)][i] / times[(1, 64)][i]
        print(f"latency growth N=64 -> 4096 (one request), {side}: {growth:.1f}x")

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "host" if device.type == "cpu" else device.type
    out = RESULTS / f"request-attention-{name}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "request_attention",
                "device": f"host CPU ({platform.machine()})"
                if device.type == "cpu"
                else torch.cuda.get_device_name(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
