"""GLUE: the nine tasks, read from a folder in GLUE's download layout or from the dataset hub.

    from rayeff.data.glue import load_split
    examples = load_split("sst2", "train", data_dir="../shared/data/glue")

What a run learns from a preset (its labels and metrics) reaches the loops as a `LabelledTask` (rayeff/data/task.py).
An example set is a plain dict of columns: `text_a`, `text_b` (None for single-sentence tasks) and `label`
(class index, or a float score for the STS-B regression task).
"""

from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from rayeff.errors import UserError


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str                        # folder name in GLUE's download layout
    hub_config: str                    # `datasets.load_dataset("glue", hub_config)`
    text_columns: tuple[str, ...]      # TSV header names (hub column names in `hub_text_columns`)
    hub_text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None     # None: regression
    metrics: tuple[str, ...]           # the official metrics; the first is the one runs are compared on
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    headerless_columns: dict | None = None  # CoLA's TSV has no header: column index per name


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")
_BINARY = ("0", "1")

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", "cola", ("sentence",), ("sentence",), "label", _BINARY, ("matthews_correlation",),
             headerless_columns={"label": 1, "sentence": 3}),
    GlueTask("sst2", "SST-2", "sst2", ("sentence",), ("sentence",), "label", _BINARY, ("accuracy",)),
    GlueTask("mrpc", "MRPC", "mrpc", ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", _BINARY,
             ("f1", "accuracy")),
    GlueTask("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
             ("pearson", "spearmanr")),
    GlueTask("qqp", "QQP", "qqp", ("question1", "question2"), ("question1", "question2"), "is_duplicate", _BINARY,
             ("f1", "accuracy")),
    GlueTask("mnli", "MNLI", "mnli", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label", _NLI3,
             ("accuracy",), dev_file="dev_matched.tsv", hub_dev_split="validation_matched"),
    GlueTask("mnli-mm", "MNLI", "mnli", ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label", _NLI3,
             ("accuracy",), dev_file="dev_mismatched.tsv", hub_dev_split="validation_mismatched"),
    GlueTask("qnli", "QNLI", "qnli", ("question", "sentence"), ("question", "sentence"), "label", _NLI2,
             ("accuracy",)),
    GlueTask("rte", "RTE", "rte", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _NLI2,
             ("accuracy",)),
    GlueTask("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", _BINARY,
             ("accuracy",)),
]}


def canonical_task_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-matched": "mnli",
           "mnli-mismatched": "mnli-mm"}.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return key


def get_task(name: str) -> GlueTask:
    return TASKS[canonical_task_name(name)]


def _read_tsv(path: Path, task: GlueTask) -> dict:
    """One GLUE TSV file. It must be UTF-8 text; a leading byte-order mark (GLUE's own MRPC download has one) is
    dropped, and any other encoding is a one-line error naming the file."""
    from rayeff.checks import read_text_file

    csv.field_size_limit(sys.maxsize)
    text = read_text_file(path, f"GLUE {task.folder} file")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    del text
    if not rows:
        raise UserError(f"{path}: the file is empty; is this GLUE's {task.folder} file?")
    if task.headerless_columns is not None:
        columns, body = task.headerless_columns, rows
        width = max(columns.values()) + 1
    else:
        header, body = [c.strip() for c in rows[0]], rows[1:]
        columns = {name: i for i, name in enumerate(header)}
        width = len(header)
        missing = [c for c in (*task.text_columns, task.label_column) if c not in columns]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; is this GLUE's {task.folder} file?")
    body = [r for r in body if len(r) >= width]  # GLUE's QQP/MNLI files hold a few broken lines; GLUE drops them
    if not body:
        raise UserError(f"{path}: no examples (no line with all {width} columns); is this GLUE's {task.folder} file?")
    texts = [[r[columns[c]] for r in body] for c in task.text_columns]
    raw_labels = [r[columns[task.label_column]] for r in body]
    if task.labels is None:   # regression
        try:
            labels = [float(x) for x in raw_labels]
        except ValueError:
            bad = next(x for x in raw_labels if not _is_float(x))
            raise UserError(f"{path}: {task.label_column} {bad!r} is not a number ({task.name} scores are "
                            "floats)") from None
        if not all(math.isfinite(x) for x in labels):
            raise UserError(f"{path}: a {task.label_column} is not finite (nan or inf); {task.name} scores are "
                            "finite floats")
    else:
        index = {name: i for i, name in enumerate(task.labels)}
        try:
            labels = [index[x.strip()] for x in raw_labels]
        except KeyError as err:
            raise UserError(f"{path}: unexpected label {err.args[0]!r} for {task.name}") from None
    return {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": labels}


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_from_hub(task: GlueTask, split: str) -> dict:
    from rayeff.hub import hub_reachable

    if not hub_reachable():
        raise UserError(f"data.data_dir is not set and the dataset hub is unreachable from here, so GLUE/"
                        f"{task.hub_config} cannot be loaded; pass --data-dir DIR with GLUE's download layout "
                        "(e.g. ../shared/data/glue)")
    try:
        import datasets

        hub_split = task.hub_dev_split if split == "dev" else "train"
        ds = datasets.load_dataset("glue", task.hub_config, split=hub_split)
    except Exception as err:  # any failure to reach or read the hub is the same problem for the user
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"data.data_dir is not set and GLUE/{task.hub_config} could not be loaded from the dataset "
                        f"hub ({reason}); pass --data-dir DIR with GLUE's download layout") from None
    cols = task.hub_text_columns
    return {"text_a": list(ds[cols[0]]), "text_b": list(ds[cols[1]]) if len(cols) > 1 else None,
            "label": [float(x) for x in ds["label"]] if task.labels is None else list(ds["label"])}


def split_file(task: GlueTask, split: str, data_dir: str | Path) -> Path:
    return Path(data_dir) / task.folder / (task.dev_file if split == "dev" else "train.tsv")


def check_data_dir(task_name: str, data_dir: str | Path | None, splits: tuple[str, ...] = ("train", "dev")) -> None:
    """Fail early, before any Ray worker starts, when the task's files are not where the job says."""
    if data_dir is None:
        return
    task = get_task(task_name)
    if not Path(data_dir).is_dir():
        raise UserError(f"data.data_dir: {data_dir} is not a directory; pass --data-dir DIR with GLUE's download "
                        "layout (e.g. ../shared/data/glue)")
    for split in splits:
        path = split_file(task, split, data_dir)
        if path.is_dir():
            raise UserError(f"data.data_dir: {path} is a folder, not a file; {task.name} needs {task.folder}/"
                            f"train.tsv and {task.folder}/{task.dev_file} files")
        if not path.is_file():
            raise UserError(f"data.data_dir: {path} not found; {task.name} needs {task.folder}/train.tsv and "
                            f"{task.folder}/{task.dev_file}")


def load_split(task_name: str, split: str, data_dir: str | Path | None = None) -> dict:
    """Columns of one split ("train" or "dev") of a GLUE task, from `data_dir` or, when it is None, the hub."""
    task = get_task(task_name)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', not {split!r}")
    if data_dir is None:
        return _load_from_hub(task, split)
    check_data_dir(task.name, data_dir, (split,))
    return _read_tsv(split_file(task, split, data_dir), task)
