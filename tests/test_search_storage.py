"""Search storage (codesign.search.storage): files that are not studies are refused by name, workers
that start together on a fresh study each get their own index (their sampler seed), and no parameter
set is evaluated twice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from codesign.errors import SearchError
from codesign.passes import DeadCodeElimination
from codesign.search import ObjectiveSettings, Tuner
from codesign.search.storage import open_storage
from codesign.search.tuner import DUPLICATE_ATTR, WORKER_ATTR
from tests.conftest import tiny_program

FAST = ObjectiveSettings(calibration=(64, 64))


@pytest.mark.parametrize(
    ("name", "content", "url", "message"),
    [
        ("empty.db", b"", "sqlite:///{}", "is empty, not an SQLite database"),
        ("notes.db", b"these are my notes\n", "sqlite:///{}", "is not an SQLite database"),
        ("study.log", b"\x00\x01garbage\n", "journal:{}", "is not an Optuna journal"),
    ],
)
def test_a_file_that_is_not_a_study_is_refused_by_name(
    tmp_path: Path, name: str, content: bytes, url: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SearchError, match=message) as err:
        open_storage(url.format(path))
    assert str(path) in str(err.value)
    assert path.read_bytes() == content  # left as it was


_OPENER = textwrap.dedent(
    """
    import pathlib, sys, time
    import optuna
    from codesign.search.storage import claim_and_seed, open_study_once
    url, ready, go = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    ready.touch()  # imported: wait for the others, then all open the study at once
    while not go.exists():
        time.sleep(0.001)

    def create(storage):
        study = optuna.create_study(storage=storage, study_name="race", load_if_exists=True)
        return study, claim_and_seed(study, url, lambda: study.enqueue_trial({"x": 0.5}))

    _, index = open_study_once(url, create)
    print(index)
    """
)


# the journal's own file locking makes four openers wait seconds for each other: make test-slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("journal", marks=pytest.mark.slow)])
def test_workers_starting_together_on_a_fresh_study_each_get_an_index(
    tmp_path: Path, repo_root: Path, kind: str
) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'race.log'}"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, url, str(r), str(go)],
            cwd=repo_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-400:] for _, err in outs]
    assert sorted(int(out) for out, _ in outs) == [0, 1, 2, 3]
    import optuna

    study = optuna.load_study(study_name="race", storage=open_storage(url))
    assert len(study.trials) == 1  # seeded once, not once per worker


def test_a_parameter_set_already_evaluated_is_not_evaluated_again() -> None:
    # one pass without knobs (its switch) and the micro-batch size: a handful of points, so the sampler
    # repeats some
    tuner = Tuner(
        tiny_program("din"), "h100", settings=FAST, storage=":memory:", passes=[DeadCodeElimination], seed=3
    )
    evaluated: list[object] = []
    real = tuner.evaluator.evaluate

    def counting(config: object) -> object:
        evaluated.append(config)
        return real(config)  # type: ignore[arg-type]

    tuner.evaluator.evaluate = counting  # type: ignore[method-assign]
    result = tuner.run(12)
    repeats = [t for t in result.trials if DUPLICATE_ATTR in t.attrs]
    distinct = {tuple(sorted(t.params.items())) for t in result.trials}
    assert repeats, "the space is too large for the sampler to repeat itself: the test says nothing"
    assert len(evaluated) == len(distinct) == len(result.trials) - len(repeats)
    first = {t.number: t for t in result.trials}
    for t in repeats:
        original = first[t.attrs[DUPLICATE_ATTR]]
        assert t.params == original.params and t.values == original.values
    assert all(t.attrs[WORKER_ATTR]["index"] == 0 for t in result.trials)


def test_a_trial_waits_for_an_earlier_trial_running_the_same_parameters() -> None:
    import threading

    import optuna

    from codesign.search.tuner import _twin

    study = optuna.create_study(directions=["minimize"])
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # running, as on another worker
    params = dict(first.params)
    second = study.ask()
    assert _twin(study, params, second.number + 1, wait_s=0.0) is None  # running, and no wait allowed

    def finish_later() -> None:
        time.sleep(0.3)
        study.tell(first, 0.25)

    threading.Thread(target=finish_later).start()
    t0 = time.monotonic()
    twin = _twin(study, params, second.number + 1, wait_s=30.0)
    assert twin is not None and twin.number == first.number and twin.values == [0.25]
    assert time.monotonic() - t0 >= 0.25  # it waited for the running trial, not evaluated the params itself
    assert _twin(study, {"x": -1.0}, second.number + 1, wait_s=30.0) is None  # nothing else runs these
