"""Auto-tuning: one multi-objective Optuna search over every pass's knobs, per target.

``space`` turns declared knobs into distributions, ``objectives`` judges a configuration
(latency, quality loss, memory), ``tuner`` runs the study on a storage shared by workers, and
``result`` holds the trials, the Pareto front and the variants chosen from it. Optuna is imported
only when a search runs (the ``search`` extra). The names below load lazily: importing
``codesign.search.result`` (as a deployment bundle or a report does) runs this file first, and
should not import the tuner with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from codesign.lazy import lazy_exports

if TYPE_CHECKING:
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

_MODULES: dict[str, tuple[str, ...]] = {
    "codesign.search.objectives": ("OBJECTIVE_NAMES", "Evaluation", "Evaluator", "ObjectiveSettings"),
    "codesign.search.result": ("SearchResult", "TrialRecord", "VariantChoice", "pareto_front"),
    "codesign.search.space": ("Param", "SearchSpace", "TrialConfig", "build_space"),
    "codesign.search.tuner": (
        "DEFAULT_STORAGE",
        "Tuner",
        "load_result",
        "open_storage",
        "recover_stale_trials",
        "tune",
    ),
}
# public name -> the module that defines it (imported on first access)
_LAZY: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
