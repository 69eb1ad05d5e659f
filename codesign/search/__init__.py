"""Auto-tuning: one multi-objective Optuna search over every pass's knobs, per target.

``space`` turns declared knobs into distributions, ``objectives`` judges a configuration
(latency, quality loss, memory), ``tuner`` runs the study on a storage shared by workers, and
``result`` holds the trials, the Pareto front and the variants chosen from it. Optuna is imported
only when a search runs (the ``search`` extra).
"""

from __future__ import annotations

from codesign.search.objectives import (
    OBJECTIVE_NAMES,
    Evaluation,
    Evaluator,
    ObjectiveSettings,
)
from codesign.search.result import SearchResult, TrialRecord, VariantChoice, pareto_front
from codesign.search.space import Param, SearchSpace, TrialConfig, build_space
from codesign.search.tuner import (
    DEFAULT_STORAGE,
    Tuner,
    load_result,
    open_storage,
    recover_stale_trials,
    tune,
)

__all__ = [
    "DEFAULT_STORAGE",
    "OBJECTIVE_NAMES",
    "Evaluation",
    "Evaluator",
    "ObjectiveSettings",
    "Param",
    "SearchResult",
    "SearchSpace",
    "TrialConfig",
    "TrialRecord",
    "Tuner",
    "VariantChoice",
    "build_space",
    "load_result",
    "open_storage",
    "pareto_front",
    "recover_stale_trials",
    "tune",
]
