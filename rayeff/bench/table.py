"""`rayeff bench table`: finished grid sweeps (one per task or setting) gathered into one table that
`rayeff bench priors --table` replays sweeps from.

    rayeff bench table runs/table-read/sst2 runs/table-read/rte ... --output benchmarks/issue-16/table-read.json

Every sweep must have run the same grid (`searcher.kind: grid`) of the same method, to its end. Each task is named
by its sweep's folder; each configuration keeps its dev metric (null when the trial failed), energy with its
source, training time and status, and each task the sweep settings and descriptors that made it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rayeff.checks import check_output_file
from rayeff.cluster.storage import write_json_atomic
from rayeff.errors import UserError

TABLE_VERSION = 1


def _read_sweep(folder: str) -> dict:
    path = Path(folder) / "sweep.json"
    if not path.is_file():
        raise UserError(f"{folder}: no sweep.json; give folders of finished `rayeff tune` sweeps")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None


def _configuration(trial: dict, folder: str) -> dict:
    """A trial as a table row: run to its end (its dev metric) or failed (no metric). A trial stopped early (an
    energy budget, a time limit) has a metric that is not comparable with the others': refused."""
    if trial["status"].startswith("stopped"):
        raise UserError(f"{folder}: trial {trial['number']} is '{trial['status']}'; a table needs every "
                        "configuration run to its end (no energy budget or time limit in the grid sweep)")
    finished = trial["status"] == "finished" and trial.get("objectives")
    energy = trial.get("energy") or {}
    return {"params": trial["params"], "dev": trial["objectives"][0] if finished else None,
            "status": trial["status"], "energy_j": energy.get("joules"), "energy_source": energy.get("source"),
            "train_seconds": (trial.get("time") or {}).get("train_seconds")}


def build_table(folders: list[str], output: str, made_by: str | None = None, overwrite: bool = False) -> dict:
    output_path = check_output_file(output, "--output", overwrite)
    if len(folders) < 2:
        raise UserError("bench table: give at least two sweep folders (a replay needs a target and a source)")
    names = [Path(f).name for f in folders]
    if len(set(names)) < len(names):
        raise UserError(f"bench table: the folders' names name the tasks and must differ: {names}")
    table: dict = {"version": TABLE_VERSION, "made_by": made_by, "tasks": {}}
    for folder, name in zip(folders, names):
        sweep = _read_sweep(folder)
        spec = sweep["sweep"]
        searcher = spec["searcher"]
        if searcher["kind"] != "grid":
            raise UserError(f"{folder}: a {searcher['kind']} sweep; a table is made of grid sweeps "
                            "(searcher: {kind: grid, grid: ...})")
        method = sweep["descriptors"]["method"]
        table.setdefault("method", method)
        table.setdefault("grid", searcher["grid"])
        if method != table["method"] or searcher["grid"] != table["grid"]:
            raise UserError(f"{folder}: its method and grid differ from {folders[0]}'s; a table holds one grid")
        objective = spec["objective"][0] if isinstance(spec["objective"], list) else spec["objective"]
        points = math.prod(len(v) for v in searcher["grid"].values())
        if len(sweep["trials"]) < points:
            raise UserError(f"{folder}: {len(sweep['trials'])} of the grid's {points} points ran; finish the sweep "
                            "(rayeff tune ... --resume, with num_trials set to the grid's size)")
        configurations = [_configuration(t, folder) for t in sweep["trials"]]
        if all(c["dev"] is None for c in configurations):
            raise UserError(f"{folder}: every trial failed; its sweep's trial folders say why")
        table["tasks"][name] = {"sweep": folder, "descriptors": sweep["descriptors"],
                                "metric": sweep["objective_labels"][0], "mode": objective["mode"],
                                "settings": spec["overrides"], "configurations": configurations}
    write_json_atomic(output_path, table)
    return table
