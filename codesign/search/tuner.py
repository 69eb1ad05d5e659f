"""The tuner: one multi-objective Optuna study over a search space, with storage and workers.

Storage is a URL: ``sqlite:///codesign-search.db`` (the default), ``postgresql://...`` (Optuna's
RDB storage, for workers on many machines), ``journal:path/to/file.log`` (an append-only file that
processes on one machine or a shared file system can all write), or ``:memory:``. Several workers
(``workers=`` here, or more ``codesign search`` processes on the same storage and study name)
share one study; every trial is numbered by the storage, so none is run twice or lost.

A worker that dies leaves its trial RUNNING. Whoever opens the study next fails that trial
("stale") and queues its parameters again, so a kill costs at most the running trial's time: a
trial is stale when its worker ran on this machine and its process is gone, or when it has been
running longer than ``stale_after_s`` (for workers on other machines; RDB storages also use
Optuna's heartbeat). Stale trials do not count toward the trial budget.

Reproducibility: one worker, the same seed and a cost-model objective give the same trials (the
cost model is deterministic). Measured latency and several workers are not reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from codesign.backends import get_backend
from codesign.errors import CodesignError, SearchError
from codesign.hardware.target import Target, get_target
from codesign.ir.program import Program
from codesign.passes.manager import Pass
from codesign.search.objectives import (
    CONSTRAINT_NAMES,
    OBJECTIVE_NAMES,
    Evaluator,
    Hopeless,
    ObjectiveSettings,
)
from codesign.search.result import SearchResult, TrialRecord
from codesign.search.space import SearchSpace, build_space
from codesign.search.storage import (
    claim_and_seed,
    open_storage,
    open_study_once,
    optuna_module,
)

__all__ = [
    "DEFAULT_STORAGE",
    "SAMPLERS",
    "Tuner",
    "counted_trials",
    "load_result",
    "open_storage",
    "recover_stale_trials",
    "tune",
]

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///codesign-search.db"
SAMPLERS = ("tpe", "nsga2")
# a measured search tries every backend that runs here (aoti: ~1 min of build per trial on 2 cores)
MEASURED_BACKENDS = ("eager", "inductor", "aoti")
STUDY_ATTR = "codesign"
WORKER_ATTR = "codesign.worker"
CONFIG_ATTR = "codesign.config"
REASON_ATTR = "codesign.reason"
STALE_ATTR = "codesign.stale"
DUPLICATE_ATTR = "codesign.duplicate_of"  # a trial whose parameters a finished trial had already run
DEFAULT_STALE_AFTER_S = 3600.0


def _optuna() -> Any:
    return optuna_module()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: Any, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and queue their parameters again.

    Returns the numbers of the trials failed.
    """
    optuna = _optuna()
    host = socket.gethostname()
    now = datetime.datetime.now()
    storage = study._storage  # Optuna's public storage API works on trial ids
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR) or {}
        gone = worker.get("host") == host and not _pid_alive(int(worker.get("pid", -1)))
        old = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > stale_after_s
        if not (gone or old):
            continue
        why = f"worker {worker.get('host')}:{worker.get('pid')} " + (
            "died" if gone else f"silent > {stale_after_s:.0f} s"
        )
        try:
            storage.set_trial_user_attr(t._trial_id, STALE_ATTR, True)
            storage.set_trial_user_attr(t._trial_id, REASON_ATTR, f"stale: {why}; parameters queued again")
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it meanwhile
        study.enqueue_trial(dict(t.params), user_attrs={"codesign.retry_of": t.number})
        failed.append(t.number)
        log.warning("trial %d: %s; re-queued", t.number, why)
    return failed


def counted_trials(study: Any) -> int:
    """Finished trials that count toward the budget (stale ones do not)."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(STALE_ATTR))


@dataclasses.dataclass(frozen=True)
class _StudyKey:
    """What a study is about; a resumed study must match it."""

    model: str
    target: str
    latency_source: str
    space: str
    settings: dict[str, Any]
    sampler: str


class Tuner:
    """One worker of a study: opens (or resumes) it and runs trials until the budget is spent.

    >>> tuner = Tuner(program, "h100", storage=":memory:", seed=0)
    >>> result = tuner.run(trials=100)
    >>> result.select_variants(3)
    """

    def __init__(
        self,
        program: Program,
        target: str | Target = "host",
        *,
        settings: ObjectiveSettings | None = None,
        passes: Sequence[Pass | type[Pass]] | None = None,
        backends: Sequence[str] | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        sampler: str = "tpe",
        seed: int = 0,
        worker: int = 0,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
    ) -> None:
        if sampler not in SAMPLERS:
            raise SearchError(f"unknown sampler {sampler!r}", fix=f"choose one of {SAMPLERS}")
        self.program = program
        self.target = get_target(target)
        self.settings = settings or ObjectiveSettings()
        self.evaluator = Evaluator(program, self.target, self.settings)
        if backends is None and self.evaluator.measured:
            backends = MEASURED_BACKENDS
        elif backends is None:
            # the deployable artifact where a codesign backend lowers for the target; none for TPU/MTIA
            backends = tuple(b for b in ("aoti",) if get_backend(b).supports(self.target))
        if not self.evaluator.measured and len(backends) > 1:
            raise SearchError(
                f"backends {list(backends)} cannot be told apart by the cost model",
                fix="search backends with a measured objective (target 'host'), or name one backend",
            )
        self.space: SearchSpace = build_space(
            self.target,
            passes=passes,
            backends=backends,
            candidates=self.settings.candidates,
            requests=self.settings.requests,
        )
        self.storage_url = DEFAULT_STORAGE if storage is None else storage
        self.study_name = (
            study_name
            or f"{program.name}-{self.target.name}-{'measured' if self.evaluator.measured else 'predicted'}"
        )
        self.sampler_name = sampler
        self.seed = seed
        self.worker = worker
        self.stale_after_s = stale_after_s
        self._pass_classes = {c.name: c for c in self.space.pipeline}
        self._study: Any = None
        self.worker_index = 0  # taken from the study when it is opened

    # ---- study -----------------------------------------------------------------------------
    def _key(self) -> _StudyKey:
        return _StudyKey(
            self.program.name,
            self.target.name,
            self.evaluator.latency_source,
            self.space.signature(),
            self.settings.to_dict(),
            self.sampler_name,
        )

    def _sampler(self, index: int) -> Any:
        optuna = _optuna()
        seed = self.seed + index  # workers must not draw the same points: each has its own index
        # constraints reach the samplers through trial.set_constraint (see objective)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler_name == "nsga2":
                return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)

    @property
    def study(self) -> Any:
        return self.open()

    def open(self) -> Any:
        """Create or resume the study (checking it matches this search) and recover stale trials."""
        if self._study is None:
            self._study = self._open_study()
        return self._study

    def _open_study(self) -> Any:
        # opened and set up by one worker at a time: a fresh study is created and seeded once, and each
        # worker takes its own index (its sampler's seed) from it (codesign.search.storage)
        study = open_study_once(self.storage_url, self._create_study)
        recover_stale_trials(study, self.stale_after_s)
        return study

    def _create_study(self, storage: Any) -> Any:
        optuna = _optuna()
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            directions=["minimize"] * len(OBJECTIVE_NAMES),
            load_if_exists=True,
        )
        key = json.loads(json.dumps(dataclasses.asdict(self._key())))  # as the storage gives it back

        def seed() -> None:  # the study's first worker only (claim_and_seed): never seeded twice
            if stored is not None:  # a study from before worker indices were counted
                return
            study.set_user_attr(STUDY_ATTR, key)
            # the default pipeline is the first trial: the front is never worse than what compile() gives
            study.enqueue_trial(self.space.defaults(), user_attrs={"codesign.seeded": "default pipeline"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(OBJECTIVE_NAMES))

        stored = study.user_attrs.get(STUDY_ATTR)
        self.worker_index = claim_and_seed(study, self.storage_url, seed)
        if stored is not None and stored != key:
            diff = sorted(k for k in key if stored.get(k) != key[k])
            raise SearchError(
                f"study '{self.study_name}' in {self.storage_url} was made with other {', '.join(diff)}",
                fix="resume with the same model, target and settings, or pick a new --study-name",
            )
        study.sampler = self._sampler(self.worker_index)
        return study

    # ---- one trial ---------------------------------------------------------------------------
    def objective(self, trial: Any) -> tuple[float, ...]:
        optuna = _optuna()
        trial.set_user_attr(
            WORKER_ATTR,
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "worker": self.worker,
                "index": self.worker_index,
            },
        )
        try:
            params = self.space.suggest(trial)
            same = _twin(trial.study, trial.params, trial.number)
            if same is not None:  # another worker (or an earlier run) already evaluated these parameters
                return _reuse(trial, same, CONSTRAINT_NAMES)
            config = self.space.configure(params)
            trial.set_user_attr(CONFIG_ATTR, config.to_dict())
            ev = self.evaluator.evaluate(config)
        except Hopeless as exc:
            trial.set_user_attr(REASON_ATTR, f"pruned: {exc}")
            raise optuna.TrialPruned(str(exc)) from exc
        except Exception as exc:
            message = exc.message if isinstance(exc, CodesignError) else str(exc)
            reason = f"{type(exc).__name__}: {message}"
            trial.set_user_attr(REASON_ATTR, reason[:2000])
            log.warning("trial %d failed: %s", trial.number, reason.splitlines()[0])
            raise
        constraints = ev.constraints(self.settings)
        for name, value in zip(CONSTRAINT_NAMES, constraints, strict=True):
            trial.set_constraint(name, value)
        trial.set_user_attr("constraints", list(constraints))
        trial.set_user_attr("evaluation", ev.to_dict())
        return ev.values()

    # ---- running -----------------------------------------------------------------------------
    def run(self, trials: int, *, callbacks: Sequence[Callable[[Any, Any], None]] = ()) -> SearchResult:
        """Run trials until the study holds ``trials`` counted finished trials (all workers together)."""
        if trials < 1:
            raise SearchError(f"trials must be >= 1, got {trials}")
        optuna = _optuna()
        study = self.study
        remaining = trials - counted_trials(study)

        def stop_when_done(study: Any, trial: Any) -> None:
            if counted_trials(study) >= trials:
                study.stop()

        if remaining > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(
                    self.objective,
                    n_trials=remaining,
                    callbacks=[stop_when_done, *callbacks],
                    catch=(Exception,),
                    gc_after_trial=False,
                )
        return self.result()

    def result(self) -> SearchResult:
        return result_from_study(
            self.study, self.storage_url, self.target.name, self.evaluator.latency_source, self.settings
        )


def result_from_study(
    study: Any,
    storage_url: str,
    target: str,
    latency_source: str,
    settings: ObjectiveSettings | dict[str, Any],
) -> SearchResult:
    records = []
    for t in study.get_trials(deepcopy=False):
        attrs = dict(t.user_attrs)
        constraints = attrs.pop("constraints", None)
        records.append(
            TrialRecord(
                number=t.number,
                state=t.state.name,
                params=dict(t.params),
                values=tuple(t.values) if t.values is not None else None,
                constraints=tuple(constraints) if constraints is not None else None,
                config=attrs.pop(CONFIG_ATTR, None),
                reason=str(attrs.pop(REASON_ATTR, "")),
                attrs=attrs,
            )
        )
    s = settings.to_dict() if isinstance(settings, ObjectiveSettings) else dict(settings)
    return SearchResult(study.study_name, storage_url, target, latency_source, s, records)


def load_result(storage: str, study_name: str) -> SearchResult:
    """The result of a stored study (for reports and dashboards; no model needed)."""
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError as exc:
        raise SearchError(f"no study named {study_name!r} in {storage}") from exc
    key = study.user_attrs.get(STUDY_ATTR) or {}
    return result_from_study(
        study,
        storage,
        str(key.get("target", "?")),
        str(key.get("latency_source", "?")),
        key.get("settings", {}),
    )


def _finished_with_params(study: Any, params: dict[str, Any], number: int) -> Any:
    """A complete trial of ``study`` (other than ``number``) that ran exactly ``params``, or None."""
    optuna = _optuna()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != number and t.params == params and DUPLICATE_ATTR not in t.user_attrs:
            return t
    return None


TWIN_WAIT_S = 900.0  # the longest a trial waits for an earlier trial running the same parameters


def _twin(study: Any, params: dict[str, Any], number: int, wait_s: float = TWIN_WAIT_S) -> Any:
    """A finished trial that ran ``params``; if an earlier trial is running them now (another worker
    drew the same parameters at the same moment), wait for it rather than evaluate them twice. None
    when there is none, or the earlier one fails (its worker died: Optuna's heartbeat fails it)."""
    optuna = _optuna()
    running = optuna.trial.TrialState.RUNNING
    deadline = time.monotonic() + wait_s
    while True:
        same = _finished_with_params(study, params, number)
        if same is not None:
            return same
        earlier = [
            t
            for t in study.get_trials(deepcopy=False, states=(running,))
            if t.number < number and t.params == params and DUPLICATE_ATTR not in t.user_attrs
        ]
        if not earlier or time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def _reuse(trial: Any, same: Any, constraint_names: Sequence[str]) -> tuple[float, ...]:
    """Record ``trial`` as a repeat of ``same``: its results, without evaluating the parameters again."""
    for key in (CONFIG_ATTR, "evaluation", "constraints"):
        if key in same.user_attrs:
            trial.set_user_attr(key, same.user_attrs[key])
    for name, value in zip(constraint_names, same.user_attrs.get("constraints", ()), strict=False):
        trial.set_constraint(name, value)
    trial.set_user_attr(DUPLICATE_ATTR, same.number)
    return tuple(same.values)


# ---- workers -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _WorkerJob:
    model: str
    factory_kwargs: dict[str, Any]
    target: str
    settings: ObjectiveSettings
    passes: tuple[type[Pass], ...] | None  # classes pickle by reference: they must be importable
    backends: tuple[str, ...] | None
    storage: str
    study_name: str
    sampler: str
    seed: int
    trials: int
    worker: int


def _worker_main(job: _WorkerJob) -> None:
    from codesign.ir.capture import capture
    from codesign.ir.workload import load_model_ref

    program = capture(load_model_ref(job.model, **job.factory_kwargs))
    Tuner(
        program,
        job.target,
        settings=job.settings,
        passes=job.passes,
        backends=job.backends,
        storage=job.storage,
        study_name=job.study_name,
        sampler=job.sampler,
        seed=job.seed,
        worker=job.worker,
    ).run(job.trials)


def tune(
    model: str | Program,
    target: str | Target = "host",
    *,
    trials: int = 100,
    settings: ObjectiveSettings | None = None,
    passes: Sequence[Pass | type[Pass]] | None = None,
    backends: Sequence[str] | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    workers: int = 1,
    factory_kwargs: dict[str, Any] | None = None,
    callbacks: Sequence[Callable[[Any, Any], None]] = (),
) -> SearchResult:
    """Search pass knobs, backend options and micro-batch for ``model`` on ``target``.

    ``model`` is a model reference (``file.py:factory`` or an example name, with
    ``factory_kwargs`` such as ``{"size": "tiny"}``) or a captured ``Program``. With
    ``workers > 1`` the extra workers are processes that rebuild the model from its reference, so
    a reference is required; all of them share the study in ``storage`` (not ``:memory:``).

    >>> result = codesign.tune("dlrm", "h100", trials=100, factory_kwargs={"size": "tiny"})
    >>> [c.label for c in result.select_variants(3)]
    """
    kwargs = dict(factory_kwargs or {})
    _check_workers(model, workers, storage)
    tuner = Tuner(
        _program_of(model, kwargs),
        target,
        settings=settings,
        passes=passes,
        backends=backends,
        storage=storage,
        study_name=study_name,
        sampler=sampler,
        seed=seed,
    )
    tuner.open()  # create the study (and recover stale trials) before the workers race to it
    procs = []
    if isinstance(model, str):
        jobs = [
            _WorkerJob(
                model=model,
                factory_kwargs=kwargs,
                target=tuner.target.name,
                settings=tuner.settings,
                passes=tuner.space.pipeline if passes is not None else None,
                backends=tuple(backends) if backends is not None else None,
                storage=tuner.storage_url,
                study_name=tuner.study_name,
                sampler=sampler,
                seed=seed,
                trials=trials,
                worker=w,
            )
            for w in range(1, workers)
        ]
        procs = _start_workers(jobs)
    try:
        tuner.run(trials, callbacks=callbacks)
    finally:
        for proc in procs:
            proc.join()
    _recover_failed_workers(tuner, procs)
    return tuner.result()


def _program_of(model: str | Program, factory_kwargs: dict[str, Any]) -> Program:
    if isinstance(model, Program):
        return model
    from codesign.ir.capture import capture
    from codesign.ir.workload import load_model_ref

    return capture(load_model_ref(model, **factory_kwargs))


def _check_workers(model: str | Program, workers: int, storage: str | None) -> None:
    if workers < 1:
        raise SearchError(f"workers must be >= 1, got {workers}")
    if workers > 1 and not isinstance(model, str):
        raise SearchError(
            "workers > 1 needs a model reference (file.py:factory or an example name), not a Program",
            fix="pass the model reference, or start more 'codesign search' processes on the same storage",
        )
    if workers > 1 and storage == ":memory:":
        raise SearchError(
            "workers > 1 need a shared storage, not :memory:", fix="use sqlite:///file.db or journal:file.log"
        )


def _start_workers(jobs: Sequence[_WorkerJob]) -> list[Any]:
    """One spawned process per extra worker, each rebuilding the model from its reference."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for job in jobs:
        proc = ctx.Process(target=_worker_main, args=(job,), name=f"codesign-search-{job.worker}")
        proc.start()
        procs.append(proc)
    return procs


def _recover_failed_workers(tuner: Tuner, procs: Sequence[Any]) -> None:
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        log.warning(
            "search workers %s exited with errors; their running trials are recovered on resume", failed
        )
        with contextlib.suppress(SearchError):
            recover_stale_trials(tuner.study, tuner.stale_after_s)
