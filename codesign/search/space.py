"""The search space: every pass's and backend's declared knobs, as Optuna distributions.

Nothing here names a pass. The space is built from the pipeline it is given (by default
``codesign.passes.all_passes()``) and from the backends that can run the objective, so a new pass
with knobs is searched with no change to this code. Parameter names:

- ``<pass>.enabled`` (bool) for every pass, and ``<pass>.<knob>`` for its knobs, active only when
  the pass is enabled (and when the knob's ``when`` condition holds);
- ``backend`` (when more than one backend is searched) and ``<backend>.<knob>``, active for that
  backend only;
- ``serving.micro_batch``: candidate rows scored per call.

Passes and backends that declare themselves unavailable for the target (``unavailable(target)``)
are left out, and ``SearchSpace.excluded`` says why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from codesign.backends import Backend, get_backend
from codesign.config import Config, config_from_dict
from codesign.errors import SearchError
from codesign.hardware.target import Target
from codesign.passes import all_passes, pass_by_name
from codesign.passes.manager import Knob, Pass

__all__ = ["MICRO_BATCH", "Param", "SearchSpace", "TrialConfig", "build_space", "micro_batch_choices"]

MICRO_BATCH = "serving.micro_batch"
BACKEND = "backend"
SMALLEST_MICRO_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched value: a knob of a pass, a backend or serving, and when it is active."""

    name: str
    owner: str  # pass name, backend name, "backend" or "serving"
    knob: Knob
    # active when every (param name, allowed values) holds for the values chosen before it
    condition: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.condition)

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this value (define-by-run, so conditional params stay absent)."""
        k = self.knob
        if k.kind == "bool":
            return trial.suggest_categorical(self.name, (True, False))
        if k.kind == "categorical":
            return trial.suggest_categorical(self.name, k.choices)
        low, high = _range(self)
        if k.kind == "int" and k.log:
            return trial.suggest_categorical(self.name, _powers_of_two(int(low), int(high)))
        if k.kind == "int":
            return trial.suggest_int(self.name, int(low), int(high))
        step = None if k.log else k.step
        return trial.suggest_float(self.name, float(low), float(high), step=step, log=k.log)

    def describe(self) -> str:
        k = self.knob
        if k.kind == "bool":
            dom = "true/false"
        elif k.kind == "categorical":
            dom = "{" + ", ".join(map(str, k.choices)) + "}"
        elif k.kind == "int" and k.log:
            dom = f"powers of two in [{k.low}, {k.high}]"
        else:
            dom = f"[{k.low}, {k.high}]" + (" log" if k.log else "") + (f" step {k.step}" if k.step else "")
        cond = " if " + " and ".join(f"{n} in {list(v)}" for n, v in self.condition) if self.condition else ""
        return f"{self.name}: {k.kind} {dom}{cond}"


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """The grid of a log-scaled int knob: sizes a factor of two apart act differently, closer ones alike."""
    out = [low]
    m = 1 << max(0, low.bit_length())
    while m <= high:
        out.append(m)
        m <<= 1
    return tuple(dict.fromkeys(out))


def _range(param: Param) -> tuple[float, float]:
    k = param.knob
    if k.low is None or k.high is None:
        raise SearchError(
            f"knob '{param.name}' is a {k.kind} without a range, so it cannot be searched",
            fix="declare low= and high= on the Knob",
        )
    return k.low, k.high


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """What one trial compiles: the enabled passes with their configs, a backend, a micro-batch.

    ``backend`` is None for a cost-model search on a target no codesign backend lowers for (TPU,
    MTIA): the search then tunes the passes for it, and lowering is left to the target's toolchain.
    """

    passes: tuple[Pass, ...]
    backend: Backend | None
    micro_batch: int | None

    def pass_names(self) -> list[str]:
        return [p.name for p in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": [{"name": p.name, "config": p.config.to_dict()} for p in self.passes],
            "backend": None
            if self.backend is None
            else {"name": self.backend.name, "config": self.backend.config.to_dict()},
            "micro_batch": self.micro_batch,
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], pass_classes: Mapping[str, type[Pass]] | None = None
    ) -> TrialConfig:
        """Rebuild from ``to_dict`` output; configs load through the allow-list."""
        classes = dict(pass_classes or {})
        try:
            passes = []
            for rec in data["passes"]:
                cls_ = classes.get(rec["name"]) or pass_by_name(rec["name"])
                passes.append(cls_(config_from_dict(rec["config"])))
            backend = None
            if data["backend"] is not None:
                backend_cls = type(get_backend(data["backend"]["name"]))
                backend = backend_cls(config_from_dict(data["backend"]["config"]))
            micro = data.get("micro_batch")
        except (KeyError, TypeError) as exc:
            raise SearchError(f"not a trial config record: {exc!r} missing or malformed") from exc
        return cls(tuple(passes), backend, int(micro) if micro is not None else None)

    def compile_args(self) -> dict[str, Any]:
        """Keyword arguments of ``codesign.compile`` that build this configuration."""
        args: dict[str, Any] = {"passes": list(self.passes), "micro_batch": self.micro_batch}
        if self.backend is not None:
            args["backend"] = self.backend
        return args


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The params of one search, in suggestion order, and how values become a ``TrialConfig``."""

    target: str
    pipeline: tuple[type[Pass], ...]  # pass classes in pipeline order (a class may repeat)
    backends: tuple[type[Backend], ...]  # searched backends; the first is used when only one; may be empty
    params: tuple[Param, ...]
    excluded: Mapping[str, str]  # pass/backend name -> why it is not searched on this target

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample every active param from ``trial``; returns name -> value."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.suggest(trial)
        return values

    def defaults(self) -> dict[str, Any]:
        """The values that reproduce the default pipeline (default passes on, with default knobs)."""
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(values):
                values[p.name] = p.knob.default
        return values

    def configure(self, values: Mapping[str, Any]) -> TrialConfig:
        """Build the passes, backend and micro-batch that ``values`` describe (missing: defaults)."""
        known = {p.name for p in self.params}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SearchError(f"values name params {unknown} that this space does not have")
        full: dict[str, Any] = {}
        for p in self.params:
            if p.active(full):
                full[p.name] = values.get(p.name, p.knob.default)
        passes = []
        for cls in self.pipeline:
            if cls.name in self.excluded or not full.get(f"{cls.name}.enabled", True):
                continue
            passes.append(cls(_config(cls, cls.name, full)))
        backend = None
        if self.backends:
            backend_cls = next(b for b in self.backends if b.name == full.get(BACKEND, self.backends[0].name))
            backend = backend_cls(_config(backend_cls, backend_cls.name, full))
        return TrialConfig(tuple(passes), backend, full.get(MICRO_BATCH))

    def signature(self) -> str:
        """Hash of the params and their domains: a resumed study must search the same space."""
        rows = [(p.name, dataclasses.asdict(p.knob), p.condition) for p in self.params]
        raw = json.dumps([self.target, [c.name for c in self.pipeline], rows], sort_keys=True, default=str)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def describe(self) -> list[str]:
        lines = [p.describe() for p in self.params]
        lines += [f"(left out) {name}: {why}" for name, why in sorted(self.excluded.items())]
        return lines


def _config(cls: type[Pass] | type[Backend], owner: str, values: Mapping[str, Any]) -> Config:
    fields = {k.name: values[f"{owner}.{k.name}"] for k in cls.knobs() if f"{owner}.{k.name}" in values}
    try:
        return cls.config_class(**fields)
    except TypeError as exc:
        raise SearchError(
            f"{owner}: knobs {sorted(fields)} do not match {cls.config_class.__name__}: {exc}"
        ) from exc


def micro_batch_choices(candidates: Sequence[int], requests: int = 1) -> tuple[int, ...]:
    """Powers of two from 16 up to the largest batch (whole batch = no split)."""
    largest = max(candidates) * requests
    top = 1 << max(0, math.ceil(math.log2(largest)))
    out, m = [], SMALLEST_MICRO_BATCH
    while m < top:
        out.append(m)
        m *= 2
    return (*out, top)


def _knob_params(
    owner: str, knobs: Sequence[Knob], base: tuple[tuple[str, tuple[Any, ...]], ...]
) -> list[Param]:
    params: list[Param] = []
    for k in knobs:
        cond = base
        if k.when is not None:
            other, allowed = k.when
            if other not in {q.knob.name for q in params}:
                raise SearchError(
                    f"knob '{owner}.{k.name}' depends on '{other}', which {owner} does not declare before it",
                    fix=f"'when' must name a knob of {owner} listed earlier in knobs()",
                )
            cond = (*cond, (f"{owner}.{other}", tuple(allowed)))
        params.append(Param(f"{owner}.{k.name}", owner, k, cond))
    return params


def build_space(
    target: Target,
    *,
    passes: Sequence[Pass | type[Pass]] | None = None,
    backends: Sequence[str | Backend | type[Backend]] = ("eager",),
    candidates: Sequence[int] = (64, 1024),
    requests: int = 1,
    micro_batch: bool = True,
) -> SearchSpace:
    """The space of a search for ``target``: pass switches and knobs, backends, micro-batch.

    ``backends`` lists the backends whose choice and knobs are searched (measured searches); a
    search on the cost model keeps one backend, since the model cannot tell backends apart, or
    none (``()``) for a target no backend lowers for.
    """
    pipeline = tuple(
        p if isinstance(p, type) else type(p) for p in (passes if passes is not None else all_passes())
    )
    if not pipeline:
        raise SearchError("the pipeline to search has no passes", fix="pass passes=None for all passes")
    backend_classes: list[type[Backend]] = []
    excluded: dict[str, str] = {}
    for b in backends:
        bcls = b if isinstance(b, type) else type(get_backend(b))
        why = bcls.unavailable(target)
        if why is not None:
            excluded[bcls.name] = why
        elif bcls not in backend_classes:
            backend_classes.append(bcls)
    if backends and not backend_classes:
        raise SearchError(
            f"no backend among {[str(getattr(b, 'name', b)) for b in backends]} supports target '{target.name}'",
            fix="choose backends that run on this target ('codesign targets')",
        )
    params: list[Param] = []
    seen: set[str] = set()
    for cls in pipeline:
        if cls.name in seen:
            continue  # a pass that runs twice (cse) is switched and tuned once
        seen.add(cls.name)
        why = cls.unavailable(target)
        if why is not None:
            excluded[cls.name] = why
            continue
        enabled = Param(
            f"{cls.name}.enabled",
            cls.name,
            Knob("enabled", "bool", cls.enabled_by_default, doc=f"run {cls.name}"),
        )
        params.append(enabled)
        params += _knob_params(cls.name, cls.knobs(), ((enabled.name, (True,)),))
    if len(backend_classes) > 1:
        names = tuple(b.name for b in backend_classes)
        params.append(
            Param(BACKEND, BACKEND, Knob(BACKEND, "categorical", names[0], choices=names, doc="backend"))
        )
    for bcls in backend_classes:
        base = ((BACKEND, (bcls.name,)),) if len(backend_classes) > 1 else ()
        params += _knob_params(bcls.name, bcls.knobs(), base)
    if micro_batch:
        choices = micro_batch_choices(candidates, requests)
        knob = Knob("micro_batch", "categorical", choices[-1], choices=choices, doc="candidate rows per call")
        params.append(Param(MICRO_BATCH, "serving", knob))
    return SearchSpace(target.name, pipeline, tuple(backend_classes), tuple(params), excluded)
