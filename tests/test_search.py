"""Search: space from declared knobs, objectives, tuner (seeded, storages, workers, kill/resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import codesign
from codesign.analysis.quality import normalized_entropy, quality_loss
from codesign.errors import SearchError
from codesign.hardware.target import get_target
from codesign.passes import all_passes, default_passes
from codesign.search import (
    Evaluator,
    ObjectiveSettings,
    SearchResult,
    TrialConfig,
    TrialRecord,
    Tuner,
    build_space,
    load_result,
    pareto_front,
    tune,
)
from codesign.search.space import MICRO_BATCH
from codesign.search.tuner import STALE_ATTR, WORKER_ATTR, counted_trials, open_storage
from tests.conftest import tiny_program
from tests.search_passes import BrokenPass, GpuOnlyPass, LossyPass, SlowPass

H100 = get_target("h100")
FAST = ObjectiveSettings(calibration=(64, 64))  # fewer calibration rows: quicker trials in tests


# ---- space ------------------------------------------------------------------------------------
def test_space_has_every_declared_knob_and_a_switch_per_pass() -> None:
    space = build_space(H100)
    names = {p.name for p in space.params}
    for p in all_passes():
        if p.unavailable(H100) is not None:  # shard_embeddings: one device, nothing to shard
            assert f"{p.name}.enabled" not in names and p.name in space.excluded
            continue
        assert f"{p.name}.enabled" in names
        for k in p.knobs():
            assert f"{p.name}.{k.name}" in names
    assert MICRO_BATCH in names
    multi = {p.name for p in build_space(get_target("h100", 8)).params}
    assert {"shard_embeddings.sharding_types", "shard_embeddings.memory_margin"} <= multi
    assert space.backends[0].name == "eager" and "backend" not in names  # one backend: not a choice


def test_new_pass_adds_its_knobs_without_search_changes() -> None:
    space = build_space(H100, passes=[*all_passes(), LossyPass(), GpuOnlyPass()])
    names = {p.name for p in space.params}
    assert {"test_lossy.enabled", "test_lossy.lossy", "test_lossy.scale", "test_gpu_only.level"} <= names
    host_space = build_space(get_target("host"), passes=[*all_passes(), GpuOnlyPass()])
    assert "test_gpu_only.level" not in {p.name for p in host_space.params}
    assert "needs a GPU" in host_space.excluded["test_gpu_only"]


def test_conditional_knobs_are_only_suggested_when_active() -> None:
    space = build_space(H100, passes=[LossyPass()], micro_batch=False)
    off = space.suggest(optuna.trial.FixedTrial({"test_lossy.enabled": True, "test_lossy.lossy": False}))
    assert "test_lossy.scale" not in off
    on = space.suggest(
        optuna.trial.FixedTrial(
            {"test_lossy.enabled": True, "test_lossy.lossy": True, "test_lossy.scale": 0.3}
        )
    )
    assert on["test_lossy.scale"] == 0.3
    disabled = space.suggest(optuna.trial.FixedTrial({"test_lossy.enabled": False}))
    assert set(disabled) == {"test_lossy.enabled"}
    assert space.configure(disabled).passes == ()


def test_backends_are_searched_on_the_host_and_refused_where_they_cannot_run() -> None:
    host = build_space(get_target("host"), backends=("eager", "inductor", "tensorrt"))
    names = {p.name for p in host.params}
    assert "backend" in names and "inductor.mode" in names
    assert "tensorrt" in host.excluded
    cond = next(p for p in host.params if p.name == "inductor.mode").condition
    assert cond == (("backend", ("inductor",)),)
    with pytest.raises(SearchError, match="no backend"):
        build_space(get_target("host"), backends=("tensorrt",))
    with pytest.raises(SearchError, match="cannot be told apart"):
        Tuner(tiny_program("din"), "h100", backends=("eager", "aoti"), storage=":memory:")


def test_defaults_reproduce_the_default_pipeline_and_configs_round_trip() -> None:
    space = build_space(H100)
    config = space.configure(space.defaults())
    expected = [p for p in default_passes() if p.unavailable(H100) is None]  # no sharding on one device
    assert config.pass_names() == [p.name for p in expected]  # FP8 is opt-in: off by default
    assert [p.uuid() for p in config.passes] == [p.uuid() for p in expected]
    again = TrialConfig.from_dict(config.to_dict())
    assert [p.uuid() for p in again.passes] == [p.uuid() for p in config.passes]
    assert again.backend.uuid() == config.backend.uuid() and again.micro_batch == config.micro_batch
    with pytest.raises(SearchError, match="does not have"):
        space.configure({"no_such.knob": 1})


class _RecordingTrial:
    """Stands in for an Optuna trial: records what a param asks for and answers with the last choice."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.asked.append(("categorical", tuple(choices)))
        return choices[-1]

    def suggest_int(self, name: str, low: int, high: int, **kwargs: Any) -> int:
        self.asked.append(("int", (low, high)))
        return high

    def suggest_float(self, name: str, low: float, high: float, **kwargs: Any) -> float:
        self.asked.append(("float", (low, high)))
        return high


def test_log_int_knobs_search_powers_of_two() -> None:
    space = build_space(H100)
    param = next(p for p in space.params if p.name == "group_embedding_bags.max_group_rows")
    assert param.knob.kind == "int" and param.knob.log
    trial = _RecordingTrial()
    value = param.suggest(trial)
    ((kind, grid),) = trial.asked
    low, high = int(param.knob.low), int(param.knob.high)  # type: ignore[arg-type]
    # the grid is every power of two from low to high, and nothing else
    assert kind == "categorical" and grid == tuple(
        1 << e for e in range(low.bit_length() - 1, high.bit_length())
    )
    assert grid[0] == low and grid[-1] == high and value == high
    assert param.describe().startswith(f"{param.name}: int powers of two in [{low}, {high}]")
    # the configured pass gets the value as an int knob
    config = space.configure({**space.defaults(), param.name: grid[3]})
    grouping = next(p for p in config.passes if p.name == "group_embedding_bags")
    assert grouping.config.max_group_rows == grid[3] == low << 3  # type: ignore[attr-defined]


# ---- quality ----------------------------------------------------------------------------------
def test_quality_loss_is_zero_for_the_reference_and_grows_with_damage() -> None:
    logits = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0))
    same = quality_loss([logits], [logits.clone()])
    assert same.loss_pct == 0.0 and same.max_abs_error == 0.0
    small = quality_loss([logits], [logits * 1.05]).loss_pct
    large = quality_loss([logits], [logits * 1.5]).loss_pct
    assert 0 < small < large
    labels = (torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.3).double()
    # a constant prediction at the base rate has NE 1 by definition
    assert normalized_entropy(
        torch.full((1000,), torch.logit(labels.mean()).item()), labels
    ) == pytest.approx(1.0)


# ---- objectives -------------------------------------------------------------------------------
def test_micro_batch_trades_latency_for_memory_on_the_cost_model() -> None:
    ev = Evaluator(tiny_program("multitask"), H100, FAST)
    space = build_space(H100, candidates=FAST.candidates)
    whole = ev.evaluate(space.configure({MICRO_BATCH: 1024}))
    pieces = ev.evaluate(space.configure({MICRO_BATCH: 64}))
    assert whole.latency_source.startswith("predicted") and whole.quality.loss_pct == 0.0
    assert pieces.latency_s > whole.latency_s and pieces.memory_bytes < whole.memory_bytes
    # the 1024-candidate request in pieces of 64 costs 16 calls of 64
    assert pieces.latency_by_candidates[1024] == pytest.approx(16 * pieces.latency_by_candidates[64])


def test_measured_objective_on_the_host() -> None:
    settings = ObjectiveSettings(candidates=(32, 128), repeats=3, calibration=(64,))
    ev = Evaluator(tiny_program("din"), get_target("host"), settings)
    assert ev.measured and ev.latency_source.startswith("measured")
    space = build_space(get_target("host"), backends=("eager",), candidates=settings.candidates)
    result = ev.evaluate(space.configure({}))
    assert all(v > 0 for v in result.latency_by_candidates.values())
    assert result.quality.loss_pct == 0.0
    with pytest.raises(SearchError, match="only be measured"):
        Evaluator(tiny_program("din"), H100, ObjectiveSettings(measure="measured"))


def test_bad_settings_are_refused_with_every_problem() -> None:
    with pytest.raises(SearchError, match=r"candidates must be positive.*measure must be"):
        ObjectiveSettings(candidates=(0,), measure="guess")


# ---- tuner ------------------------------------------------------------------------------------
def _params_and_values(result: SearchResult) -> list[tuple[dict[str, object], tuple[float, ...] | None]]:
    return [(t.params, t.values) for t in result.trials]


def test_same_seed_gives_the_same_trials() -> None:
    program = tiny_program("multitask")
    # trial 0 is the default pipeline whatever the seed; the sampled trials after it tell seeds apart
    runs = [Tuner(program, "h100", settings=FAST, storage=":memory:", seed=s).run(5) for s in (7, 7, 8)]
    assert _params_and_values(runs[0]) == _params_and_values(runs[1])
    assert _params_and_values(runs[0]) != _params_and_values(runs[2])


def test_search_returns_a_front_of_distinct_variants_and_picks_them() -> None:
    tuner = Tuner(tiny_program("multitask"), "h100", settings=FAST, storage=":memory:")
    result = tuner.run(30)
    assert result.counts() == {"COMPLETE": 30}
    assert result.trials[0].params == tuner.space.defaults()  # the default pipeline is trial 0
    front = result.pareto
    assert len(front) >= 3 and len({t.values for t in front}) == len(front)
    for t in front:  # no front member is dominated by any complete trial
        assert not any(
            all(a <= b for a, b in zip(o.values, t.values, strict=True)) and o.values != t.values
            for o in result.trials
            if o.values is not None
        )
    chosen = result.select_variants(3)
    assert len({c.trial.number for c in chosen}) == 3
    assert "fast" in chosen[0].labels
    fastest = min(front, key=lambda t: t.values[0])
    assert chosen[0].trial.number == fastest.number
    # a chosen configuration compiles into a variant that scores like the captured model
    program = tiny_program("multitask")
    args = {**chosen[1].config().compile_args(), "backend": "eager"}  # h100 is planned for, not run, here
    variant = codesign.compile(program, target="host", **args)
    batch = program.sample_batch([300], seed=3)
    torch.testing.assert_close(variant.score(batch), program.run(batch), rtol=1e-4, atol=1e-5)


def test_quality_budget_is_a_constraint_and_failures_are_recorded(tmp_path: Path) -> None:
    settings = ObjectiveSettings(calibration=(128, 128), quality_budget_pct=0.05)
    passes = [LossyPass(), BrokenPass(), *all_passes()[1:2]]
    result = Tuner(
        tiny_program("multitask"), "h100", settings=settings, passes=passes, storage=":memory:"
    ).run(25)
    lossy = [t for t in result.trials if t.values is not None and t.values[1] > 0]
    assert lossy, "the lossy pass never damaged quality in 25 trials"
    assert any(not t.feasible for t in lossy)
    assert all(t.feasible for t in result.pareto)
    failed = [t for t in result.trials if t.state == "FAIL"]
    assert failed and all("exploded on purpose" in t.reason for t in failed)
    assert all(t.params.get("test_broken.explode") for t in failed)


def test_hopeless_trials_are_pruned_with_their_reason() -> None:
    settings = ObjectiveSettings(latency_slo_ms=1e-4, calibration=(64,))
    result = Tuner(tiny_program("din"), "h100", settings=settings, storage=":memory:").run(4)
    assert result.counts() == {"PRUNED": 4}
    assert all("SLO" in t.reason for t in result.trials)
    with pytest.raises(SearchError, match="no feasible"):
        result.select_variants()


def test_resuming_a_study_with_other_settings_is_refused(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    Tuner(tiny_program("din"), "h100", settings=FAST, storage=storage, study_name="x").run(2)
    again = Tuner(tiny_program("din"), "h100", settings=FAST, storage=storage, study_name="x").run(4)
    assert len(again.trials) == 4  # resumed: two more, not four
    with pytest.raises(SearchError, match="other"):
        Tuner(tiny_program("din"), "a100", settings=FAST, storage=storage, study_name="x").open()
    assert len(load_result(storage, "x").trials) == 4


def test_storage_urls_are_checked() -> None:
    with pytest.raises(SearchError, match="not a URL"):
        open_storage("results.db")
    with pytest.raises(SearchError, match="journal storage needs a file path"):
        open_storage("journal:")


def test_result_round_trips_through_json(tmp_path: Path) -> None:
    result = Tuner(tiny_program("din"), "h100", settings=FAST, storage=":memory:").run(5)
    again = SearchResult.load(result.save(tmp_path / "r.json"))
    assert [t.values for t in again.trials] == [t.values for t in result.trials]
    assert [t.number for t in again.pareto] == [t.number for t in result.pareto]


def test_pareto_front_keeps_one_trial_per_objective_vector() -> None:
    def rec(n: int, values: tuple[float, ...], feasible: bool = True) -> TrialRecord:
        return TrialRecord(n, "COMPLETE", {}, values, (-1.0 if feasible else 1.0,), None)

    trials = [
        rec(0, (1, 0, 5)),
        rec(1, (1, 0, 5)),
        rec(2, (2, 0, 1)),
        rec(3, (3, 0, 6)),
        rec(4, (0, 0, 0), False),
    ]
    assert [t.number for t in pareto_front(trials)] == [0, 2]


def test_result_says_which_backend_won() -> None:
    def rec(
        n: int, backend: str, latency: float, feasible: bool = True, state: str = "COMPLETE"
    ) -> TrialRecord:
        config = {"backend": {"name": backend, "config": {}}}
        return TrialRecord(n, state, {}, (latency, 0.0, 1.0), (-1.0 if feasible else 1.0,), config)

    trials = [
        rec(0, "eager", 3.0),
        rec(1, "inductor", 2.0),
        rec(2, "aoti", 0.5, feasible=False),  # over the SLO: does not win
        rec(3, "aoti", 1.5),
        rec(4, "inductor", 1.0, state="FAIL"),
        rec(5, "eager", 2.5),
    ]
    result = SearchResult("s", ":memory:", "host", "measured", {}, trials)
    won = result.backends()
    assert list(won) == ["aoti", "inductor", "eager"]
    assert won["eager"] == {"trials": 2, "latency_ms": 2.5, "trial": 5}
    assert won["aoti"]["trial"] == 3
    assert result.to_dict()["backends"] == won


def test_measured_search_tries_aoti_by_default() -> None:
    tuner = Tuner(tiny_program("din"), "host", storage=":memory:")
    assert [b.name for b in tuner.space.backends] == ["eager", "inductor", "aoti"]


@pytest.mark.slow  # two AOTInductor builds (~1 min each on 2 cores)
def test_measured_search_builds_and_times_aoti_trials() -> None:
    settings = ObjectiveSettings(candidates=(64,), repeats=3, calibration=(64, 64))
    result = Tuner(
        tiny_program("din"), "host", settings=settings, storage=":memory:", backends=("aoti",)
    ).run(2)
    assert result.counts() == {"COMPLETE": 2}
    assert all(t.attrs["evaluation"]["latency_source"].startswith("measured") for t in result.trials)


# longest a spawned worker may take to import, capture the model and finish its first trial
WORKER_START_S = 60.0


# two worker processes each (10-40 s), on both file storages: make test-slow
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_study(tmp_path: Path, kind: str) -> None:
    storage = (
        f"journal:{tmp_path / 'study.log'}" if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    )

    def wait_for_the_other_worker(study: Any, trial: Any) -> None:
        # trials take milliseconds here; without this the first worker could finish the budget before the
        # spawned one has imported torch, and the test would say nothing about sharing
        deadline = time.monotonic() + WORKER_START_S
        while time.monotonic() < deadline and not any(
            (t.user_attrs.get(WORKER_ATTR) or {}).get("pid") not in (None, os.getpid()) for t in study.trials
        ):
            time.sleep(0.1)

    result = tune(
        "din",
        "h100",
        trials=16,
        settings=FAST,
        storage=storage,
        workers=2,
        factory_kwargs={"size": "tiny"},
        callbacks=[wait_for_the_other_worker],
    )
    numbers = [t.number for t in result.trials]
    assert numbers == list(range(len(numbers)))  # numbered by the storage: no duplicate, no gap
    assert all(t.state == "COMPLETE" for t in result.trials)
    assert 16 <= len(numbers) <= 17  # the budget may overshoot by workers - 1
    workers = {t.attrs[WORKER_ATTR]["pid"] for t in result.trials}
    assert len(workers) == 2


_WORKER_SCRIPT = textwrap.dedent(
    """
    import sys
    import codesign
    from codesign.passes import all_passes
    from codesign.search import ObjectiveSettings, Tuner
    from tests.search_passes import SlowPass
    program = codesign.capture(codesign.load_model_ref("din", size="tiny"))
    settings = ObjectiveSettings(calibration=(64,))
    Tuner(program, "h100", settings=settings, passes=[SlowPass(), *all_passes()[:2]],
          storage=sys.argv[1], study_name="kill").run(int(sys.argv[2]))
    """
)


@pytest.mark.slow  # a worker process killed mid-trial, then a resumed study: 40 s
def test_killing_a_worker_loses_at_most_its_running_trial(tmp_path: Path, repo_root: Path) -> None:
    storage = f"journal:{tmp_path / 'kill.log'}"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, storage, "10"], cwd=repo_root, env=env)
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and killed is None:
            time.sleep(0.05)
            if not (tmp_path / "kill.log").exists():
                continue
            try:
                study = optuna.load_study(study_name="kill", storage=open_storage(storage))
            except KeyError:
                continue
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state.is_finished()]
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
            if len(done) >= 2 and running and WORKER_ATTR in running[0].user_attrs:
                proc.send_signal(signal.SIGKILL)
                killed = running[0].number
    finally:
        proc.kill()
        proc.wait()
    assert killed is not None, "the worker never reached a running trial"
    before = {t.number: tuple(t.values or ()) for t in study.get_trials() if t.state.is_finished()}

    settings = ObjectiveSettings(calibration=(64,))
    tuner = Tuner(
        tiny_program("din"),
        "h100",
        settings=settings,
        passes=[SlowPass(), *all_passes()[:2]],
        storage=storage,
        study_name="kill",
    )
    result = tuner.run(10)
    by_number = {t.number: t for t in result.trials}
    stale = by_number[killed]
    assert stale.state == "FAIL" and stale.attrs.get(STALE_ATTR) and "died" in stale.reason
    assert all(
        tuple(by_number[n].values or ()) == v for n, v in before.items()
    )  # finished trials kept as they were
    retried = [t for t in result.trials if t.attrs.get("codesign.retry_of") == killed]
    assert len(retried) == 1 and retried[0].state == "COMPLETE"
    assert stale.params.items() <= retried[0].params.items()  # the same parameters, run again
    assert counted_trials(tuner.study) == 10
    assert not [t for t in result.trials if t.state == "RUNNING"]


def test_targets_without_a_backend_are_still_searched_on_the_cost_model() -> None:
    tuner = Tuner(tiny_program("din"), "tpu-v5e", settings=FAST, storage=":memory:")
    assert tuner.space.backends == ()
    result = tuner.run(3)
    assert result.counts() == {"COMPLETE": 3}
    config = result.select_variants(1)[0].config()
    assert config.backend is None and "backend" not in config.compile_args()
    assert TrialConfig.from_dict(config.to_dict()).backend is None


@pytest.mark.slow
def test_host_measured_search_of_twenty_trials_runs_end_to_end() -> None:
    settings = ObjectiveSettings(candidates=(64, 512), repeats=3, calibration=(128, 128))
    tuner = Tuner(
        tiny_program("din"),
        "host",
        settings=settings,
        storage=":memory:",
        backends=("eager", "inductor", "aoti"),
    )
    result = tuner.run(20)
    assert result.latency_source.startswith("measured")
    assert result.counts().get("COMPLETE", 0) >= 18  # Inductor may fail a configuration; the study goes on
    assert result.pareto and all(
        t.attrs["evaluation"]["latency_source"].startswith("measured") for t in result.pareto
    )
