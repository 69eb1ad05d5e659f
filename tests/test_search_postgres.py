"""Search on a real PostgreSQL server (the storage for sweeps across machines): four worker processes
start together on a fresh study, each gets its own index, no parameter set is evaluated twice, and a
worker killed in the middle of a trial loses nothing the others finished.

The server is a private cluster this test starts (initdb + pg_ctl in a temporary folder, a Unix socket
only, no TCP); `.ci/run` installs Debian's postgresql package for it. Without the server binaries the
test skips, saying so. The opener race runs in ``make test``; the five search workers in ``make test-slow``.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_search_storage import _OPENER  # the same four openers, on a server


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
        )
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver (psycopg2-binary, in the dev extra)")
    # not under pytest's folders: they are private to this user, and the server runs as another when we are root
    root = Path(tempfile.mkdtemp(prefix="codesign-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        os.chmod(root, 0o777)
        os.chmod(sock, 0o777)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "codesign"], check=True, capture_output=True
    )
    opts = f"-p {port} -k {sock} -c listen_addresses='' -c max_connections=100"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://codesign@/postgres?host={sock}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_WORKER = textwrap.dedent(
    """
    import pathlib, sys, time
    from codesign.search import ObjectiveSettings, Tuner
    from codesign.passes import DeadCodeElimination
    from tests.conftest import tiny_program
    url, ready, go, doomed = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4] == "1"
    program = tiny_program("din")
    ready.touch()
    while not doomed and not go.exists():
        time.sleep(0.001)
    tuner = Tuner(program, "h100", settings=ObjectiveSettings(calibration=(64, 64)), storage=url,
                  study_name="pg", passes=[DeadCodeElimination], seed=11)
    if doomed:  # this worker is killed in the middle of its first trial (the study's seeded default)
        def hang(config):
            pathlib.Path(str(ready) + ".trial").touch()
            time.sleep(600)
        tuner.evaluator.evaluate = hang
    tuner.run(12)
    """
)


def _start(script: str, *args: str, repo_root: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(paths: list[Path], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(p.exists() for p in paths), f"never appeared: {[str(p) for p in paths if not p.exists()]}"


def test_openers_starting_together_on_a_fresh_postgresql_study_each_get_an_index(
    postgres_url: str, repo_root: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [_start(_OPENER, postgres_url, str(r), str(go), repo_root=repo_root) for r in ready]
    _wait_for(ready, 120)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-600:] for _, err in outs]
    assert sorted(int(out) for out, _ in outs) == [0, 1, 2, 3]
    import optuna

    from codesign.search.storage import open_storage

    study = optuna.load_study(study_name="race", storage=open_storage(postgres_url))
    assert len(study.trials) == 1  # seeded once, not once per worker


@pytest.mark.slow  # five search processes, one killed: make test-slow
def test_workers_on_postgresql_share_one_study_and_survive_a_killed_one(
    postgres_url: str, repo_root: Path, tmp_path: Path
) -> None:
    import optuna

    from codesign.search.storage import open_storage
    from codesign.search.tuner import DUPLICATE_ATTR, WORKER_ATTR

    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(5)]
    doomed = _start(_WORKER, postgres_url, str(ready[4]), str(go), "1", repo_root=repo_root)
    workers = [_start(_WORKER, postgres_url, str(r), str(go), "0", repo_root=repo_root) for r in ready[:4]]
    try:
        _wait_for([Path(f"{ready[4]}.trial"), *ready[:4]], 300)  # the doomed one is inside its trial
        go.touch()  # the four start together, on the study the doomed worker made
        time.sleep(0.5)
        doomed.send_signal(signal.SIGKILL)
        outs = [p.communicate(timeout=600) for p in workers]
        doomed.wait(timeout=30)
    finally:
        for p in (doomed, *workers):
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in workers] == [0] * 4, [err[-600:] for _, err in outs]
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 12
    indices = sorted(t.user_attrs[WORKER_ATTR]["index"] for t in trials if WORKER_ATTR in t.user_attrs)
    assert set(indices) == set(range(5))  # five workers, five sampler seeds
    evaluated = [tuple(sorted(t.params.items())) for t in done if DUPLICATE_ATTR not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated)), "a parameter set was evaluated twice"
    running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) <= 1  # only the killed worker's trial (until the heartbeat fails it)
    assert sum(1 for t in trials if t.user_attrs.get("codesign.seeded")) == 1  # seeded once
