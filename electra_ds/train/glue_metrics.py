"""GLUE metrics (scikit-learn / scipy) and their summary over seeds.

Metric values are fractions / correlations in [-1, 1]; tables multiply by 100. A correlation that is
undefined (constant or non-finite predictions, constant labels) counts as 0, the convention scikit-learn's MCC
uses, so one diverged seed scores 0 instead of voiding the task.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "mcc": ("mcc",),
    "accuracy": ("accuracy",),
    "accuracy_f1": ("accuracy", "f1"),
    "correlation": ("spearman", "pearson"),
}


def compute_metrics(metric: str, predictions: Sequence[float] | np.ndarray,
                    labels: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The named GLUE metric(s) of `predictions` against `labels` (class indices, or scores for correlation)."""
    from scipy import stats
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if metric not in METRIC_KEYS:
        raise ValueError(f"unknown GLUE metric {metric!r}; choose one of {sorted(METRIC_KEYS)}")
    preds, gold = np.asarray(predictions), np.asarray(labels)
    if preds.shape != gold.shape or preds.ndim != 1 or not len(preds):
        raise ValueError(f"predictions {preds.shape} and labels {gold.shape} must be equal-length, non-empty 1-D")
    if metric == "correlation":
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
        if not np.isfinite(preds).all() or np.ptp(preds) == 0 or np.ptp(gold) == 0:
            return {"spearman": 0.0, "pearson": 0.0}
        return {"spearman": float(stats.spearmanr(preds, gold)[0]), "pearson": float(stats.pearsonr(preds, gold)[0])}
    preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    if metric == "mcc":
        return {"mcc": float(matthews_corrcoef(gold, preds))}
    result = {"accuracy": float(accuracy_score(gold, preds))}
    if metric == "accuracy_f1":
        result["f1"] = float(f1_score(gold, preds, pos_label=1, zero_division=0.0))
    return result


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median and spread of one metric over seeds (NaN-free input)."""
    arr = np.asarray(values, dtype=np.float64)
    if not len(arr) or not np.isfinite(arr).all():
        raise ValueError(f"cannot summarize {list(values)}: need one or more values, all finite")
    return {"median": float(np.median(arr)), "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


__all__ = ["METRIC_KEYS", "compute_metrics", "summarize"]
