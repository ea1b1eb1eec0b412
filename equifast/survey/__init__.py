"""Surveys over many models, kept in a SQLite store (:mod:`equifast.survey.store`).

Example:
    >>> from equifast.survey import open_store, run_survey
    >>> run_survey(["resnet18", "vit_tiny_patch16_224"], "/imagenet/val", "survey.sqlite",
    ...            group="translate:8,16,32", limit=1000)                   # doctest: +SKIP
    >>> open_store("survey.sqlite").runs                                    # doctest: +SKIP
"""

from equifast.survey.runner import (
    ModelOutcome,
    SurveySummary,
    family_of,
    measure_model,
    resolve_models,
    run_survey,
)
from equifast.survey.store import (
    SCHEMA_VERSION,
    SurveyStore,
    export_store,
    model_key,
    open_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "ModelOutcome",
    "SurveyStore",
    "SurveySummary",
    "export_store",
    "family_of",
    "measure_model",
    "model_key",
    "open_store",
    "resolve_models",
    "run_survey",
]
