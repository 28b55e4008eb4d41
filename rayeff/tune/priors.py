"""Transfer-learned priors: a store of finished sweeps, and the warm start a new sweep takes from the most similar.

The store is one SQLite file (`priors.store`, default runs/priors.db). Each finished sweep is kept with descriptors
of its task and setting (task type, input shape, number of labels, training-set size, model family and size,
method), its search space and its trials. A sweep with `priors: auto` ranks the stored sweeps of its method by
distance between descriptors, takes the best trials of the nearest ones, maps them into its own search space and
evaluates them first (Optuna's enqueued trials); with `narrow: true` each numeric range shrinks to the region the
priors' good trials occupied, widened by a margin. Without priors nothing here runs.

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
from rayeff.tune.space import ParamSpec, SearchSpace

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
LOG_MARGIN = 2.0        # a narrowed log-scale range reaches this factor beyond the good trials
LINEAR_MARGIN = 0.1     # ... and a linear one this fraction of the original range


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


def best_trials(entry: dict, count: int) -> list[dict]:
    """A stored sweep's `count` best feasible trials by its first objective."""
    mode = entry["objectives"][0]["mode"]
    feasible = [t for t in entry["trials"] if t["feasible"] and t["objectives"]]
    return sorted(feasible, key=lambda t: t["objectives"][0], reverse=mode == "max")[:count]


def fit_into(params: dict, space: SearchSpace) -> dict:
    """A prior trial's parameters mapped into a search space: numbers clipped (and rounded onto its grid),
    choices kept where the space has them; parameters the space lacks are dropped, and those it has but the prior
    lacks are left to the sampler."""
    out = {}
    for key, p in space.params.items():
        if key not in params:
            continue
        value = params[key]
        if p.type == "categorical":
            if value in p.choices:
                out[key] = value
            continue
        value = min(max(float(value), p.low), p.high)
        if p.step:
            value = p.low + round((value - p.low) / p.step) * p.step
        out[key] = int(round(value)) if p.type == "int" else value
    return out


def narrowed(space: SearchSpace, good: list[dict]) -> SearchSpace:
    """Each numeric range shrunk to the span of the good trials' values plus a margin, within the original."""
    params = {}
    for key, p in space.params.items():
        values = [t[key] for t in good if key in t]
        if p.type == "categorical" or not values:
            params[key] = p
            continue
        if p.log:
            low, high = min(values) / LOG_MARGIN, max(values) * LOG_MARGIN
        else:
            margin = LINEAR_MARGIN * (p.high - p.low)
            low, high = min(values) - margin, max(values) + margin
        low, high = max(low, p.low), min(high, p.high)
        if p.type == "int":
            low, high = math.floor(low), math.ceil(high)
        if p.step:   # keep the original grid
            low = p.low + math.floor((low - p.low) / p.step) * p.step
            high = p.low + math.ceil((high - p.low) / p.step) * p.step
        params[key] = ParamSpec(**{**p.model_dump(), "low": low, "high": min(high, p.high)})
    return SearchSpace(method=space.method, params=params)


def warm_start(store: PriorStore, descriptors: dict, space: SearchSpace, max_sweeps: int, top_trials: int,
               narrow: bool) -> tuple[SearchSpace, list[dict], dict]:
    """From the stored sweeps of the same method nearest to `descriptors`: the (possibly narrowed) space, the
    configurations to evaluate first (each with the prior it came from), and what was used, for sweep.json."""
    ranked = sorted(((distance(descriptors, e["descriptors"]), e) for e in store.entries(descriptors["method"])),
                    key=lambda de: de[0])
    chosen = [(d, e) for d, e in ranked if best_trials(e, 1)][:max_sweeps]
    first: list[dict] = []
    for _, e in chosen:
        for t in best_trials(e, top_trials):
            params = fit_into(t["params"], space)
            if params and params not in [f["params"] for f in first]:
                first.append({"params": params, "prior": e["id"]})
    if narrow and first:
        space = narrowed(space, [f["params"] for f in first])
        first = [{**f, "params": fit_into(f["params"], space)} for f in first]
    used = {"store": str(store.path), "sweeps": [{"id": e["id"], "name": e["name"], "distance": round(d, 4),
                                                  "task": e["descriptors"]["task"]} for d, e in chosen],
            "enqueued": first, "narrowed_space": space.model_dump(mode="json") if narrow and first else None}
    return space, first, used
