"""benchmarks/gpu.py dry-run on the CPU: the script a lent GPU runs must not fail there for its own bugs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # three Inductor compiles of tiny models (~1-2 min on 2 cores)
def test_gpu_script_dry_run_measures_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--dry-run",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["target"] == "host"
    errors = {k: v.get("error") for k, v in record["parts"].items() if "result" not in v}
    assert errors == {}, errors
    rows = record["parts"]["vs_compile"]["result"]
    assert [r["layout"] for r in rows] == ["1x64", "1x1024", "16x64"]
    assert all(r["best_vs_compile"] > 0 and r["compile_s"] > 0 for r in rows)
    useq = record["parts"]["useq"]["result"]
    assert useq["agrees_with_eager"] is True
    assert 0 < useq["p50_s"] <= useq["p99_s"]
    assert useq["flops_per_call"] > 0
    assert useq["mfu"] == pytest.approx(useq["flops_per_call"] / useq["p50_s"] / useq["peak_flops_per_s"])
    assert "request_sharing" in useq["passes_applied"]
