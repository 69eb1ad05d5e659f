"""The codesign command: results as tables or JSON, user errors as one message on stderr (exit 2),
bad flag values refused at parse time, library warnings kept quiet, and a --help that needs no torch."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from codesign.cli import main
from codesign.cli.app import build_parser
from codesign.cli.flags import DEFAULT_TARGET, HelpFormatter
from tests.conftest import tiny_workload

ROOT = Path(__file__).resolve().parent.parent


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    """stdout as one JSON document (fails when anything else was printed there)."""
    return json.loads(capsys.readouterr().out)


def test_profile_prints_ops_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["profile", "dcnv2", "--size", "tiny", "--candidates", "128", "--requests", "2"]
    assert main([*args, "--targets", "host", "h100", "mtia-v2"]) == 0
    out = capsys.readouterr().out
    assert "top ops by predicted time" in out and "linear.default" in out
    assert "h100" in out and "mtia-v2" in out and "no (predicted)" in out
    assert main([*args, "--targets", "h100", "--top", "3", "--json"]) == 0
    data = _json(capsys)
    assert [t["target"] for t in data["targets"]] == ["h100"] and len(data["top_ops"]) == 3


def test_compile_then_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "b"
    assert main(["compile", "din", "--size", "tiny", "--out", str(out_dir), "--passes", "cse,dce"]) == 0
    assert (out_dir / "manifest.json").is_file()
    printed = capsys.readouterr().out
    assert "pass stats" in printed and "{'" not in printed  # stats as rows, never a dict repr
    assert "request-level inputs: flat (user features repeated" in printed  # which form capture found
    assert main(["run", str(out_dir), "--requests", "2", "--candidates", "5", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "reference outputs match" in out and "median latency" in out
    assert (
        main(["run", str(out_dir), "--requests", "2", "--candidates", "5", "--batches", "2", "--json"]) == 0
    )
    data = _json(capsys)
    assert data["reference_ok"] is True and len(data["batches"]) == 2
    assert main(["compile", "din", "--size", "tiny", "--out", str(out_dir)]) == 2  # refuses to clobber
    assert "not empty" in capsys.readouterr().err


def test_errors_go_to_stderr_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "no_such_model"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown model reference" in captured.err and "fix:" in captured.err
    assert "Traceback" not in captured.err
    assert main(["run", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["compile", "din", "--size", "tiny", "--target", "tpu-v9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown target 'tpu-v9'" in capsys.readouterr().err
    assert main(["compile", "din", "--size", "tiny", "--backend", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    # the pass manager would skip selective_fp8 on the host; the command says why instead of an empty report
    assert main(["fp8", "din", "--size", "tiny", "--target", "host"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "has no FP8 matrix units" in captured.err and "fix:" in captured.err


# every bad value is refused by argparse (exit 2, the flag named) before any work starts
BAD_VALUES = [
    (["profile", "dlrm", "--candidates", "-5"], "--candidates"),
    (["profile", "dlrm", "--top", "0"], "--top"),
    (["run", "nowhere", "--requests", "0"], "--requests"),
    (["run", "nowhere", "--repeats", "0"], "--repeats"),
    (["run", "nowhere", "--seed", "-1"], "--seed"),
    (["serve", "nowhere", "--port", "99999"], "--port"),
    (["serve", "nowhere", "--headroom", "1.5"], "--headroom"),
    (["serve", "nowhere", "--max-delay-ms", "-1"], "--max-delay-ms"),
    (["compile", "dlrm", "--size", "huge", "--out", "x"], "--size"),
    (["compile", "dlrm", "--devices", "0", "--out", "x"], "--devices"),
    (["search", "dlrm", "--trials", "-3"], "--trials"),
    (["search", "dlrm", "--candidates", "64,x"], "--candidates"),
    (["search", "dlrm", "--slo-ms", "0"], "--slo-ms"),
    (["search", "dlrm", "--workers", "0"], "--workers"),
    (["search", "dlrm", "--sampler", "grid"], "--sampler"),
    (["bundle", "out", "--k", "0"], "--k"),
    (["bundle", "out", "--budget-ms", "nan"], "--budget-ms"),
    (["plan", "dlrm", "--margin", "2"], "--margin"),
    (["fp8", "dlrm", "--budget", "-1"], "--budget"),
    (["fp8", "dlrm", "--granularity", "block"], "--granularity"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_VALUES, ids=[f"{a[0]} {f}" for a, f in BAD_VALUES])
def test_bad_values_are_refused_at_parse_time(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert re.search(rf"argument {re.escape(flag)}\b", captured.err), captured.err
    assert captured.out == "" and "Traceback" not in captured.err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from codesign.version import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"codesign {__version__}"


def test_every_flag_has_help_and_shows_its_default() -> None:
    parser = build_parser(full=True)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        formatter = HelpFormatter(prog=name)
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"codesign {name} {action.option_strings[0]} has no help"
            assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings[0]}"


def test_knob_flags_are_the_passes_knobs() -> None:
    from codesign.passes import SelectiveFp8
    from codesign.passes.sharding import ShardEmbeddings

    for command, knobs, skip in (
        ("fp8", SelectiveFp8.knobs(), ()),
        ("plan", ShardEmbeddings.knobs(), ("sharding_types",)),
    ):
        args = build_parser(command).parse_args([command, "dlrm"])
        for k in knobs:
            if k.name not in skip:
                assert getattr(args, k.name) == k.default, f"{command} --{k.name}"


def test_one_default_target_for_compile_plan_and_search() -> None:
    defaults = {
        cmd: build_parser(cmd).parse_args([cmd, "dlrm", *extra]).target
        for cmd, extra in (("compile", ["--out", "x"]), ("plan", []), ("search", []))
    }
    assert defaults == dict.fromkeys(defaults, DEFAULT_TARGET) and DEFAULT_TARGET == "host"


def test_search_flag_constants_match_the_tuner() -> None:
    from codesign.cli import search
    from codesign.search import tuner

    assert (search.SAMPLERS, search.DEFAULT_STORAGE) == (tuner.SAMPLERS, tuner.DEFAULT_STORAGE)


def test_targets_lists_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name in ("h100", "h200", "a100", "l4", "mi300x", "tpu-v5e", "tpu-v5p", "tpu-v6e", "mtia-v2", "host"):
        assert name in out
    assert main(["targets", "--json"]) == 0
    assert {"h100", "host"} <= {t["name"] for t in _json(capsys)["targets"]}


# runs the host calibration twice (12 s): `make test-slow`
@pytest.mark.slow
def test_calibrate_measures_caches_and_measures_again_when_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CODESIGN_CACHE_DIR", str(tmp_path))
    assert main(["calibrate", "--json"]) == 0
    first = _json(capsys)
    cache = Path(first["cache"])
    assert first["measured"] is True and cache.parent == tmp_path and cache.is_file()
    assert first["matmul_flops_per_s"]["fp32"] > 1e8 and first["memory_bandwidth_bytes_per_s"] > 1e8
    assert 0 < first["launch_overhead_s"] < 1e-3
    stored = cache.read_text()
    assert main(["calibrate", "--json"]) == 0
    again = _json(capsys)
    assert again["measured"] is False and again["matmul_flops_per_s"] == first["matmul_flops_per_s"]
    assert cache.read_text() == stored
    assert main(["calibrate", "--force"]) == 0
    assert "measured now" in capsys.readouterr().out
    assert json.loads(cache.read_text()) != json.loads(stored)  # new timings, never bit-identical


def test_library_warnings_are_quiet_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    from codesign.cli import targets

    def noisy(args: object) -> int:
        warnings.warn("a library's internal note", UserWarning, stacklevel=1)
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(targets, "run", noisy)
    for argv, expected in ((["targets"], 0), (["-v", "targets"], 2)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert main(argv) == 0
        assert len(seen) == expected, argv


def test_search_prints_the_front_saves_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["search", "din", "--size", "tiny", "--target", "h100", "--storage", storage, "--no-progress"]
    assert main([*args, "--trials", "6", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "Pareto front" in out and "predicted by the cost model for h100" in out and "fast" in out
    assert "{'" not in out  # counts as words, never a dict repr
    assert len(json.loads((tmp_path / "r.json").read_text())["trials"]) == 6
    assert main([*args, "--trials", "8", "--json"]) == 0  # the same study: two more trials
    data = _json(capsys)
    assert sum(data["counts"].values()) == 8 and data["front"]


def test_search_errors_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "din", "--size", "tiny", "--storage", "nowhere.db", "--no-progress"]) == 2
    assert "is not a URL" in capsys.readouterr().err


def test_fp8_prints_every_layer_and_saves_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_workload("multitask").model
    # eligible=linear+embedding: the pass reports every Linear and Embedding(Bag) of the model
    layers = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding | torch.nn.EmbeddingBag)
    ]
    out = tmp_path / "fp8.json"
    assert main(["fp8", "multitask", "--size", "tiny", "--budget", "0.05", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selective FP8 for h100" in text and "combined NE change" in text
    report = json.loads(out.read_text())
    assert report["budget_pct"] == 0.05
    assert sorted(layer["module"] for layer in report["layers"]) == sorted(layers)
    # the first cell of each table row (continuation lines of a wrapped row have an empty one)
    printed = [cell for cell in re.findall(r"^│ (\S+) +│", text, re.M) if cell != "layer"]
    assert printed == [layer["node"] for layer in report["layers"]]
    assert f"of {len(layers)};" in text
    assert main(["fp8", "multitask", "--size", "tiny", "--budget", "0.05", "--json"]) == 0
    assert _json(capsys)["layers"] == report["layers"]
    assert main(["fp8", "multitask", "--size", "tiny", "--target", "a100"]) == 2
    assert "target 'a100'" in capsys.readouterr().err
    # a report from it, with --json; and an --out that cannot be written is one message on stderr
    assert main(["report", str(out), "--out", str(tmp_path / "r.html"), "--json", "--no-progress"]) == 0
    assert Path(_json(capsys)["out"]).is_file()
    assert main(["report", str(out), "--out", str(out / "r.html"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err


def test_run_scores_a_multi_variant_bundle_with_every_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, passes in (("full", "request_sharing,cse"), ("plain", "cse")):
        argv = [
            "compile",
            "din",
            "--size",
            "tiny",
            "--passes",
            passes,
            "--out",
            str(tmp_path / name),
            "--verify",
            "in_process",  # test_compile_then_run proves a CLI bundle in a fresh process
            "--json",
        ]
        assert main(argv) == 0
        compiled = _json(capsys)  # the JSON alone on stdout
        assert compiled["target"] == "host" and Path(compiled["out"]) == tmp_path / name
        assert [p["name"] for p in compiled["passes"]] == passes.split(",")
    multi = tmp_path / "multi"
    variants = ["--variant", f"full={tmp_path / 'full'}", "--variant", f"plain={tmp_path / 'plain'}"]
    argv = [
        "bundle",
        str(multi),
        *variants,
        "--repeats",
        "1",
        "--policy",
        "fixed:plain",
        "--verify",
        "in_process",
    ]
    assert main([*argv, "--json"]) == 0
    assert [v["variant"] for v in _json(capsys)["variants"]] == ["full", "plain"]
    assert main(["run", str(multi), "--batches", "2", "--repeats", "1", "--json"]) == 0
    data = _json(capsys)
    assert data["routing"]["variant"] == "plain" and data["reference_ok"] is True
    assert [(b["batch"], b["variant"]) for b in data["batches"]] == [
        (0, "full"),
        (0, "plain"),
        (1, "full"),
        (1, "plain"),
    ]
    assert [b["variant"] for b in data["batches"] if b["routed"]] == ["plain", "plain"]
    assert main(["run", str(multi), "--batches", "1", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "routed" in text and "loaded full" in text and "loaded plain" in text


def test_help_imports_no_torch() -> None:
    # codesign/__init__.py imports the whole API (torch) eagerly; stand an empty package in for it so
    # that this checks what the CLI itself imports to build its parsers
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('codesign'); pkg.__path__ = [{str(ROOT / 'codesign')!r}]\n"
        "sys.modules['codesign'] = pkg\n"
        "from codesign.cli import main\n"
        "codes = [main(['--help'])] + [main([c, '--help']) for c in\n"
        "    ('profile', 'compile', 'run', 'search', 'bundle', 'serve', 'report', 'targets')]\n"
        "assert codes == [0] * 9, codes\n"
        "assert 'torch' not in sys.modules, 'the help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: codesign" in proc.stdout
