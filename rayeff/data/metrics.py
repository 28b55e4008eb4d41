"""GLUE's official metrics, computed from predictions and references."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from rayeff.data.glue import get_task


def compute_metrics(task_name: str, predictions, references) -> dict[str, float]:
    """`predictions` are class indices (classification) or scores (STS-B regression)."""
    task = get_task(task_name)
    preds, refs = np.asarray(predictions), np.asarray(references)
    out = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(refs, preds))
        elif name == "f1":
            out[name] = float(f1_score(refs, preds))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(refs, preds))
        elif name == "pearson":
            out[name] = float(pearsonr(preds, refs)[0]) if np.std(preds) > 0 else 0.0
        elif name == "spearmanr":
            out[name] = float(spearmanr(preds, refs)[0]) if np.std(preds) > 0 else 0.0
    return out


def primary_metric(task_name: str) -> str:
    """The metric that benchmarks and sweeps compare runs on (the first official one)."""
    return get_task(task_name).metrics[0]
