"""GLUE metrics: ``evaluate.load("glue", task)`` when it loads, else the same keys from scikit-learn/scipy.

evaluate 0.4.6 ships no metric scripts, so without the Hub ``evaluate.load`` fails; the fallback computes the
official GLUE keys itself (accuracy, f1, matthews_correlation, pearson, spearmanr) so results stay comparable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import EvalPrediction

from memopt_data import hub_reachable

logger = logging.getLogger(__name__)

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
# Configurations of evaluate's "glue" metric; mnli_matched/mismatched score like mnli.
_METRIC_CONFIGS = (*GLUE_TASKS, "mnli_matched", "mnli_mismatched", "hans")


def glue_scores(task: str | None, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The keys and values of ``evaluate.load("glue", task).compute(...)``, without evaluate.

    ``task=None`` (your own csv/json files): ``accuracy`` for classification, ``mse`` for float labels.
    """
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    if task == "stsb":
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    if task in ("mrpc", "qqp"):
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1": float(f1_score(references, predictions)),
        }
    if task is None and np.issubdtype(np.asarray(references).dtype, np.floating):
        return {"mse": float(np.mean((np.asarray(predictions) - np.asarray(references)) ** 2))}
    if task is None or task in _METRIC_CONFIGS:
        return {"accuracy": float(accuracy_score(references, predictions))}
    raise ValueError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")


def _load_evaluate_metric(task: str) -> Callable[..., dict[str, float]] | None:
    # A 2 s probe, once per process: an unreachable Hub turns offline mode on, so evaluate fails at once
    # instead of retrying for about 25 s.
    hub_reachable()
    try:
        import evaluate

        metric = evaluate.load("glue", task)
    except Exception as err:  # evaluate raises FileNotFoundError/ConnectionError/... without the Hub
        logger.info(
            "evaluate.load('glue', %r) unavailable (%s); computing the GLUE metrics with scikit-learn/scipy",
            task,
            type(err).__name__,
        )
        return None
    logger.info("GLUE metrics from evaluate.load('glue', %r)", task)
    return metric.compute


def build_compute_metrics(task: str | None, is_regression: bool) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: logits -> predictions -> GLUE metric keys."""
    compute = _load_evaluate_metric(task) if task is not None else None

    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(logits) if is_regression else np.argmax(logits, axis=1)
        if compute is not None:
            return {k: float(v) for k, v in compute(predictions=preds, references=p.label_ids).items()}
        return glue_scores(task, preds, p.label_ids)

    return compute_metrics
