"""`rayeff bench table` (grid sweeps gathered into a table) and `rayeff bench priors --table` (sweeps replayed from
it), without Ray: the sweep folders are written in sweep.json's own layout."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import optuna
import pytest

from rayeff.bench.replay import TaskTable, replay, replay_space
from rayeff.cli import main

GRID = {"training.lr": [1e-4, 1e-3, 1e-2], "method.hidden_size": [16, 64], "method.rnn": ["gru", "lstm"]}


def dev(shift: float, lr: float, hidden: int, rnn: str) -> float:
    return 0.9 - 0.05 * (math.log10(lr) + 3 - shift) ** 2 - 0.01 * (hidden == 16) - 0.03 * (rnn == "lstm")


def write_grid_sweep(folder, shift: float, kind: str = "grid", points: int | None = None, failed: int | None = None):
    """A finished sweep folder as `rayeff tune` writes one (the keys the table reads)."""
    combos = list(itertools.product(*GRID.values()))[:points]
    trials = []
    for i, (lr, hidden, rnn) in enumerate(combos):
        ok = i != failed
        trials.append({"number": i, "status": "finished" if ok else "error: RuntimeError",
                       "params": {"training.lr": lr, "method.hidden_size": hidden, "method.rnn": rnn},
                       "objectives": [dev(shift, lr, hidden, rnn)] if ok else None, "feasible": ok,
                       "energy": {"joules": 10.0 + i, "source": "estimate"}, "time": {"train_seconds": 2.0 + i}})
    sweep = {"sweep": {"searcher": {"kind": kind, "seed": 0, "grid": GRID if kind == "grid" else None},
                       "objective": {"metric": "dev", "mode": "max"}, "overrides": {"data.train_subset": 64}},
             "descriptors": {"task": folder.name, "method": "read"}, "objective_labels": ["dev accuracy, max"],
             "trials": trials}
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return folder


@pytest.fixture
def table_file(tmp_path):
    folders = [write_grid_sweep(tmp_path / name, shift, failed=3 if name == "b" else None)
               for name, shift in (("a", 0.0), ("b", 0.4), ("c", -0.4))]
    out = tmp_path / "table.json"
    assert main(["bench", "table", *map(str, folders), "--output", str(out), "--made-by", "make.sh"]) == 0
    return out


def test_the_table_keeps_every_configuration_of_every_sweep(table_file):
    table = json.loads(table_file.read_text())
    assert table["method"] == "read" and table["grid"] == GRID and table["made_by"] == "make.sh"
    assert sorted(table["tasks"]) == ["a", "b", "c"]
    b = table["tasks"]["b"]
    assert len(b["configurations"]) == 12 and b["settings"] == {"data.train_subset": 64} and b["mode"] == "max"
    assert b["configurations"][3]["dev"] is None and b["configurations"][3]["status"] == "error: RuntimeError"
    first = b["configurations"][0]
    assert first == {"params": {"training.lr": 1e-4, "method.hidden_size": 16, "method.rnn": "gru"},
                     "dev": dev(0.4, 1e-4, 16, "gru"), "status": "finished", "energy_j": 10.0,
                     "energy_source": "estimate", "train_seconds": 2.0}


def test_a_table_is_made_of_finished_grid_sweeps_of_one_grid(tmp_path, capsys):
    grid_a = write_grid_sweep(tmp_path / "a", 0.0)
    cases = [([grid_a], "give at least two sweep folders"),
             ([grid_a, write_grid_sweep(tmp_path / "t", 0.1, kind="tpe")], "a tpe sweep; a table is made of grid"),
             ([grid_a, write_grid_sweep(tmp_path / "short", 0.1, points=7)], "7 of the grid's 12 points ran"),
             ([grid_a, tmp_path / "none"], "none: no sweep.json")]
    for folders, message in cases:
        assert main(["bench", "table", *map(str, folders), "--output", str(tmp_path / "t.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t.json").exists()


def test_the_replay_counts_the_trials_each_strategy_takes_to_the_targets_top(table_file, tmp_path):
    """Checked against a replay of our own: random search's counts, run by hand with Optuna, equal the report's;
    the ratios are the medians over cold TPE's."""
    out = tmp_path / "replay.json"
    assert main(["bench", "priors", "--table", str(table_file), "--output", str(out), "--replay-seeds", "3",
                 "--source-trials", "6", "--strategies", "random,cold_tpe,transfer_ensemble"]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["a", "b", "c"] and report["max_trials"] == 12 and report["censored_at"] == 13

    table = json.loads(table_file.read_text())
    space = replay_space(GRID)
    mine = []
    for target in ("a", "b", "c"):
        values = sorted((c["dev"] for c in table["tasks"][target]["configurations"] if c["dev"] is not None),
                        reverse=True)
        best = values[0]   # top 1% and top 5% of 12 configurations: the best one
        for seed in range(3):
            study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
            lookup = TaskTable(GRID, table["tasks"][target])
            counts = []
            for n in range(1, 13):
                trial = study.ask(space)
                value = lookup(trial.params)
                study.tell(trial, value)
                counts.append(n if value >= best else None)
            mine.append(next((c for c in counts if c), 13))
    assert report["runs"]["random"]["top5"] == mine == report["runs"]["random"]["top1"]
    figures = report["strategies"]
    assert figures["random"]["median_top5"] == statistics.median(mine)
    assert figures["random"]["ratio_top5"] == figures["random"]["median_top5"] / figures["cold_tpe"]["median_top5"]
    assert figures["cold_tpe"]["ratio_top1"] == 1.0
    assert figures["transfer_ensemble"]["median_top5"] < figures["cold_tpe"]["median_top5"]
    assert set(report["per_task"]) == {"a", "b", "c"} and (tmp_path / "replay.png").stat().st_size > 10_000


def test_a_failed_configuration_counts_as_the_worst_and_the_lookup_is_exact(table_file):
    table = json.loads(table_file.read_text())
    lookup = TaskTable(GRID, table["tasks"]["b"])
    worst = min(c["dev"] for c in table["tasks"]["b"]["configurations"] if c["dev"] is not None)
    failed = table["tasks"]["b"]["configurations"][3]["params"]
    as_replayed = {k: GRID[k].index(v) if k != "method.rnn" else v for k, v in failed.items()}
    assert lookup(as_replayed) == worst
    study, reached = replay(optuna.samplers.BruteForceSampler(seed=0), lookup, replay_space(GRID), 12)
    assert reached["top1"] == next(i for i, t in enumerate(study.trials, 1) if t.value == max(lookup.values.values()))


@pytest.mark.parametrize("content, message", [
    (None, "not found; make one with `rayeff bench table"),
    ("{not json", "is not a table from `rayeff bench table` (JSONDecodeError"),
    ('{"grid": {"x": [1, 2]}, "tasks": {"a": {"mode": "max", "configurations": []}}}', "has 1 task"),
    ('{"grid": {"x": [1, 2]}, "tasks": {"a": {"mode": "max", "configurations": []}, '
     '"b": {"mode": "up", "configurations": []}}}', "task b: mode 'up'"),
    ('{"grid": {"x": [1, 2]}, "tasks": {"a": {"mode": "max", "configurations": [{"params": {"x": 1}, "dev": 0.5}]}, '
     '"b": {"mode": "max", "configurations": []}}}', "task a lacks some of the grid's configurations"),
])
def test_a_bad_table_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    assert main(["bench", "priors", "--table", str(path), "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()
