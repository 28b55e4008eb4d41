"""A task's metrics (GLUE's official ones, or those of your own data's task type), computed from predictions and
references."""

from __future__ import annotations

import numpy as np



def compute_metrics(metrics: tuple[str, ...], predictions, references) -> dict[str, float]:
    """`metrics` by name (a task's `metrics`); `predictions` are class indices (classification) or scores
    (regression)."""
    preds, refs = np.asarray(predictions), np.asarray(references)
    out = {}
    # scikit-learn and scipy.stats are imported where a task's metric needs them: together they took about 2 s of
    # every training worker's start, and most tasks (SST-2, QNLI, RTE, MNLI, WNLI) report accuracy alone.
    for name in metrics:
        if name == "accuracy":
            out[name] = float(np.mean(preds == refs))   # sklearn's accuracy_score, without its import
        elif name == "f1":
            from sklearn.metrics import f1_score
            out[name] = float(f1_score(refs, preds))
        elif name == "macro_f1":   # every class weighs the same, however rare
            from sklearn.metrics import f1_score
            out[name] = float(f1_score(refs, preds, average="macro"))
        elif name == "matthews_correlation":
            from sklearn.metrics import matthews_corrcoef
            out[name] = float(matthews_corrcoef(refs, preds))
        elif name == "pearson":
            from scipy.stats import pearsonr
            out[name] = float(pearsonr(preds, refs)[0]) if np.std(preds) > 0 else 0.0
        elif name == "spearmanr":
            from scipy.stats import spearmanr
            out[name] = float(spearmanr(preds, refs)[0]) if np.std(preds) > 0 else 0.0
    return out
