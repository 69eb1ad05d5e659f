"""Multi-variant serving: three variants of the user-sequence ranker behind one router and one HTTP server.

``full`` reads the whole history (256 items at size ``medium``) through both encoder blocks;
``short`` the last eighth through one block; ``tiny`` the last 32nd and no block. They share
weights and inputs, so one request format serves all three. The bundle profiles each (latency curve measured on this host, NE change
against ``full``) and routes with the load-aware policy: the best quality predicted to answer
within the request's budget, counting the work already queued.

    python examples/serving.py                 # build out/useq-serving, serve it, send requests
    codesign serve out/useq-serving --port 8000
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import codesign
from codesign.serving.deployment import Bundle
from codesign.serving.http import serve
from codesign.serving.router import FeatureConfig, LoadAwarePolicy, Policy

warnings.filterwarnings("ignore", module=r"torch\..*")

OUT = Path("out/useq-serving")
SIZE = "medium"


def variant_knobs(history: int) -> dict[str, dict[str, int]]:
    """useq.build() arguments of the three variants, for a model reading ``history`` items."""
    return {
        "full": {},
        "short": {"keep": max(1, history // 8), "depth": 1},
        "tiny": {"keep": max(1, history // 32), "depth": 0},
    }


def make_bundle(
    out: Path = OUT,
    *,
    size: str = SIZE,
    backend: str = "eager",
    policy: Policy | None = None,
    repeats: int = 5,
    candidates: tuple[int, ...] = (16, 64, 256, 1024),
    requests: tuple[int, ...] = (1, 4, 16),
) -> Bundle:
    """Compile the three variants, profile them on this host and save the bundle to ``out``."""
    history = int(codesign.load_model_ref("useq", size=size).metadata["keep"])
    variants = {
        name: codesign.compile(
            codesign.load_model_ref("useq", size=size, **kw), target="host", backend=backend
        )
        for name, kw in variant_knobs(history).items()
    }
    bundle = Bundle.build(
        variants,
        policy=policy or LoadAwarePolicy(default_budget_ms=100.0),
        features=FeatureConfig(history_input="history"),
        quality_reference="full",
        repeats=repeats,
        candidates=candidates,
        requests=requests,
    )
    bundle.save(out, overwrite=True)
    return bundle


def post(url: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """The status and JSON reply; a request whose budget ran out before it was scored is shed (504)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(json.loads(resp.read()))
    except urllib.error.HTTPError as err:
        return err.code, dict(json.loads(err.read()))


def main() -> int:
    bundle = make_bundle()
    for name, p in bundle.profiles.items():
        print(
            f"{name:<6} quality loss {p.quality_loss_pct:.4f}% ({p.quality_source}); "
            f"latency 1x64 {p.latency(64) * 1e3:.2f} ms, 1x1024 {p.latency(1024) * 1e3:.2f} ms ({p.latency.source})"
        )
    workload = codesign.load_model_ref("useq", size=SIZE)
    schema = bundle.schema()
    with serve(OUT, port=0) as server:
        print(f"serving {OUT} at {server.url}")
        for budget, n in ((100.0, 64), (15.0, 128), (4.0, 512)):
            body = schema.encode(workload.make_batch([n], seed=n), context={"budget_ms": budget})
            status, reply = post(server.url + "/v1/score", body)
            if status != 200:  # e.g. 504: no variant scores 512 candidates within 4 ms on a slow host
                print(f"budget {budget:>5} ms, {n:>4} candidates -> {status}: {reply['error']}")
                continue
            print(
                f"budget {budget:>5} ms, {n:>4} candidates -> {reply['variant']:<5} {reply['decision']['explanation']}"
            )
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        print("\n".join(line for line in lines if line.startswith("codesign_requests_total")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
