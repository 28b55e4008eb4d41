"""Transferred priors: a store of finished sweeps, and the sources a new sweep learns from.

The store is one SQLite file (`priors.store`, default runs/priors.db). Each finished sweep is kept with descriptors
of its task and setting (task type, input shape, number of labels, training-set size, model family and size,
method), its search space and its trials. A sweep with `priors: auto` ranks the stored sweeps of its method by
distance between descriptors, takes the nearest `max_sweeps` as sources, and samples with the transfer sampler
(`rayeff/tune/transfer.py`), which learns from how well each source ranks the new sweep's trials how much to trust
it. Without priors nothing here runs.

    rayeff priors list [--store runs/priors.db]
    rayeff priors show ID [--store runs/priors.db]
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from rayeff.config import JobSpec
from rayeff.errors import UserError
from rayeff.tune.space import SearchSpace

SCHEMA = """CREATE TABLE IF NOT EXISTS sweeps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,          -- the sweep's output folder
    finished_at TEXT NOT NULL,
    method TEXT NOT NULL,
    descriptors TEXT NOT NULL,          -- JSON
    objectives TEXT NOT NULL,           -- JSON: [{metric, mode}]
    space TEXT NOT NULL,                -- JSON: the search space the sweep ran over
    trials TEXT NOT NULL                -- JSON: [{params, objectives, feasible, status}]
)"""

# How far apart two settings are: a mismatch of a categorical descriptor costs its weight; numbers cost their
# weight per decade of ratio.
CATEGORICAL_WEIGHTS = {"task_type": 1.0, "input": 0.5, "num_labels": 0.5, "model_family": 1.0}
DECADE_WEIGHTS = {"train_size": 1.0, "model_params": 1.0}


def describe_setting(job: JobSpec, train_size: int) -> dict:
    """The descriptors of a sweep's task and setting."""
    from rayeff.data.task import task_of
    from rayeff.models import resolve_model

    task = task_of(job.data)
    family, params = model_family_and_size(resolve_model(job.model.name))
    return {"task": task.name, "task_type": job.data.task_type if task.kind in ("causal_lm", "prompted") else
            "regression" if task.is_regression else "classification",
            "input": "pair" if task.text_fields == 2 else "single", "num_labels": task.num_labels,
            "train_size": train_size, "model": job.model.name, "model_family": family, "model_params": params,
            "method": job.method.name}


def model_family_and_size(source) -> tuple[str, int]:
    """The backbone's model type and parameter count, from its config alone (built on the meta device)."""
    from rayeff.models import backbone_skeleton

    model = backbone_skeleton(source)
    return model.config.model_type, sum(p.numel() for p in model.parameters())


def distance(a: dict, b: dict) -> float:
    d = sum(w for key, w in CATEGORICAL_WEIGHTS.items() if a.get(key) != b.get(key))
    for key, w in DECADE_WEIGHTS.items():
        d += w * abs(math.log10(max(a[key], 1) / max(b[key], 1)))
    return d


class PriorStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _connect(self, create: bool) -> sqlite3.Connection:
        if not create and self.path.is_dir():
            raise UserError(f"priors.store: {self.path} is a folder; point priors.store (or --store) at the store's "
                            "SQLite file, e.g. runs/priors.db")
        if not create and not self.path.is_file():
            raise UserError(f"priors.store: {self.path} does not exist; finish a sweep first (every finished sweep "
                            "is added to its store) or point priors.store at an existing store")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        try:
            if create:
                conn.execute(SCHEMA)
            elif not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sweeps'").fetchone():
                raise sqlite3.DatabaseError("no sweeps table")
        except sqlite3.DatabaseError as err:
            conn.close()
            raise UserError(f"priors.store: {self.path} is not a rayeff prior store ({err})") from None
        conn.row_factory = sqlite3.Row
        return conn

    def add(self, name: str, descriptors: dict, objectives: list[dict], space: dict, trials: list[dict]) -> int:
        """Keep a finished sweep (replacing an earlier entry of the same sweep, e.g. before a resume)."""
        kept = [{k: t.get(k) for k in ("params", "objectives", "feasible", "status")} for t in trials]
        with closing(self._connect(create=True)) as conn, conn:
            conn.execute("DELETE FROM sweeps WHERE name = ?", (name,))
            cur = conn.execute(
                "INSERT INTO sweeps (name, finished_at, method, descriptors, objectives, space, trials) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, time.strftime("%Y-%m-%dT%H:%M:%S%z"), descriptors["method"], json.dumps(descriptors),
                 json.dumps(objectives), json.dumps(space), json.dumps(kept)))
            return cur.lastrowid

    def entries(self, method: str | None = None) -> list[dict]:
        with closing(self._connect(create=False)) as conn:
            rows = conn.execute("SELECT * FROM sweeps" + (" WHERE method = ?" if method else "") + " ORDER BY id",
                                (method,) if method else ()).fetchall()
        return [{**dict(row), **{k: json.loads(row[k]) for k in ("descriptors", "objectives", "space", "trials")}}
                for row in rows]

    def entry(self, sweep_id: int) -> dict:
        for e in self.entries():
            if e["id"] == sweep_id:
                return e
        raise UserError(f"priors: no sweep {sweep_id} in {self.path}; `rayeff priors list` shows the ids")

    def remove(self, sweep_id: int) -> dict:
        """Drop a stored sweep (e.g. a test or a mistaken sweep that should not warm-start later ones); returns
        the entry removed. Sweeps that already used it keep their own copy of it in sweep_spec.json."""
        entry = self.entry(sweep_id)
        with closing(self._connect(create=False)) as conn, conn:
            conn.execute("DELETE FROM sweeps WHERE id = ?", (sweep_id,))
        return entry


def best_trials(entry: dict, count: int) -> list[dict]:
    """A stored sweep's `count` best feasible trials by its first objective."""
    mode = entry["objectives"][0]["mode"]
    feasible = [t for t in entry["trials"] if t["feasible"] and t["objectives"]]
    return sorted(feasible, key=lambda t: t["objectives"][0], reverse=mode == "max")[:count]


def nearest_sweeps(store: PriorStore, descriptors: dict, max_sweeps: int) -> list[tuple[float, dict]]:
    """The stored sweeps of the same method with a feasible trial, nearest first, at most `max_sweeps`."""
    ranked = sorted(((distance(descriptors, e["descriptors"]), e) for e in store.entries(descriptors["method"])),
                    key=lambda de: de[0])
    return [(d, e) for d, e in ranked if best_trials(e, 1)][:max_sweeps]


def source_task(entry: dict):
    """A stored sweep as a source of the transfer sampler: its finished, feasible trials as Optuna trials over its
    space, improving in the direction of its first objective. A trial outside that space is left out."""
    import optuna

    from rayeff.tune.space import optuna_distributions
    from rayeff.tune.transfer import SourceTask

    space = optuna_distributions(SearchSpace.model_validate(entry["space"])) if entry["space"] else {}
    maximize = entry["objectives"][0]["mode"] == "max"
    trials = []
    for t in entry["trials"]:
        if not (t["feasible"] and t["objectives"] and t["status"] == "finished") or set(t["params"]) - set(space):
            continue
        try:
            trials.append(optuna.trial.create_trial(params=t["params"], value=t["objectives"][0],
                                                    distributions={k: space[k] for k in t["params"]}))
        except ValueError:   # a value outside the space it was stored with
            continue
    direction = optuna.study.StudyDirection.MAXIMIZE if maximize else optuna.study.StudyDirection.MINIMIZE
    return SourceTask(trials, direction, entry["name"], entry["descriptors"])
