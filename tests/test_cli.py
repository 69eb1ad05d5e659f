"""The codesign command: profile, compile, run, targets, and clear errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codesign.cli import main


def test_profile_prints_ops_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "profile",
                "dcnv2",
                "--size",
                "tiny",
                "--candidates",
                "128",
                "--requests",
                "2",
                "--targets",
                "host",
                "h100",
                "mtia-v2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "top ops by predicted time" in out and "linear.default" in out
    assert "h100" in out and "mtia-v2" in out and "no (predicted)" in out


def test_compile_then_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "b"
    assert (
        main(
            [
                "compile",
                "din",
                "--size",
                "tiny",
                "--backend",
                "eager",
                "--out",
                str(out_dir),
                "--passes",
                "cse,dce",
            ]
        )
        == 0
    )
    assert (out_dir / "manifest.json").is_file()
    assert main(["run", str(out_dir), "--requests", "2", "--candidates", "5", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference outputs match" in out and "median latency" in out
    assert main(["compile", "din", "--size", "tiny", "--out", str(out_dir)]) == 2  # refuses to clobber
    assert "not empty" in capsys.readouterr().out


def test_errors_are_one_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "no_such_model"]) == 2
    out = capsys.readouterr().out
    assert "unknown model reference" in out and "fix:" in out and "Traceback" not in out
    assert main(["run", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().out
    assert main(["compile", "din", "--size", "tiny", "--target", "tpu-v9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown target 'tpu-v9'" in capsys.readouterr().out


def test_targets_lists_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("h100", "h200", "a100", "l4", "mi300x", "tpu-v5e", "tpu-v5p", "tpu-v6e", "mtia-v2", "host"):
        assert name in out


def test_search_prints_the_front_saves_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["search", "din", "--size", "tiny", "--target", "h100", "--storage", storage, "--no-progress"]
    assert main([*args, "--trials", "6", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "predicted by the cost model for h100" in out and "fast" in out
    assert len(json.loads((tmp_path / "r.json").read_text())["trials"]) == 6
    assert main([*args, "--trials", "8"]) == 0  # the same study: two more trials
    assert "8 trials" in capsys.readouterr().out


def test_search_errors_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "din", "--size", "tiny", "--storage", "nowhere.db", "--no-progress"]) == 2
    assert "is not a URL" in capsys.readouterr().out
    assert main(["search", "din", "--size", "tiny", "--candidates", "64,x", "--no-progress"]) == 2
    assert "--candidates takes positive integers" in capsys.readouterr().out


def test_fp8_prints_every_layer_and_saves_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fp8.json"
    assert main(["fp8", "multitask", "--size", "tiny", "--budget", "0.05", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selective FP8 for h100" in text and "combined NE change" in text
    report = json.loads(out.read_text())
    assert len(report["layers"]) == 10 and report["budget_pct"] == 0.05
    assert main(["fp8", "multitask", "--size", "tiny", "--target", "a100"]) == 2
    assert "target 'a100'" in capsys.readouterr().out
