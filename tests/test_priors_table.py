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
from rayeff.errors import UserError

# 40 points: the top 5% is the best 2, the top 1% the best one. The lr values are written out of order (the replay
# sorts them, so that its integer axis runs as lr does).
GRID = {"training.lr": [1e-3, 1e-5, 1e-4, 1e-2, 1e-1], "method.hidden_size": [16, 32, 64, 128],
        "method.rnn": ["gru", "lstm"]}


def dev(shift: float, lr: float, hidden: int, rnn: str) -> float:
    return 0.9 - 0.05 * (math.log10(lr) + 3 - shift) ** 2 - 0.01 * math.log2(hidden / 16) - 0.03 * (rnn == "lstm")


def write_grid_sweep(folder, shift: float, kind: str = "grid", points: int | None = None, failed: int | None = None,
                     status: str = "error: RuntimeError"):
    """A finished sweep folder as `rayeff tune` writes one (the keys the table reads)."""
    combos = list(itertools.product(*GRID.values()))[:points]
    trials = []
    for i, (lr, hidden, rnn) in enumerate(combos):
        ok = i != failed
        trials.append({"number": i, "status": "finished" if ok else status,
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
    assert len(b["configurations"]) == 40 and b["settings"] == {"data.train_subset": 64} and b["mode"] == "max"
    assert b["configurations"][3]["dev"] is None and b["configurations"][3]["status"] == "error: RuntimeError"
    first = b["configurations"][0]
    assert first == {"params": {"training.lr": 1e-3, "method.hidden_size": 16, "method.rnn": "gru"},
                     "dev": dev(0.4, 1e-3, 16, "gru"), "status": "finished", "energy_j": 10.0,
                     "energy_source": "estimate", "train_seconds": 2.0}


def test_a_table_is_made_of_finished_grid_sweeps_of_one_grid(tmp_path, capsys):
    grid_a = write_grid_sweep(tmp_path / "a", 0.0)
    cases = [([grid_a], "give at least two sweep folders"),
             ([grid_a, write_grid_sweep(tmp_path / "t", 0.1, kind="tpe")], "a tpe sweep; a table is made of grid"),
             ([grid_a, write_grid_sweep(tmp_path / "short", 0.1, points=7)], "7 of the grid's 40 points ran"),
             ([grid_a, write_grid_sweep(tmp_path / "cut", 0.1, failed=5, status="stopped: energy budget")],
              "trial 5 is 'stopped: energy budget'; a table needs every configuration run to its end"),
             ([grid_a, tmp_path / "none"], "none: no sweep.json")]
    for folders, message in cases:
        assert main(["bench", "table", *map(str, folders), "--output", str(tmp_path / "t.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t.json").exists()


def test_the_replay_counts_the_trials_each_strategy_takes_to_the_targets_top(table_file, tmp_path):
    """Checked against a replay of our own, straight from the table's rows: random search's counts equal the
    report's, at the top 5% (the best 2 of 40) and the top 1% (the best one)."""
    out = tmp_path / "replay.json"
    assert main(["bench", "priors", "--table", str(table_file), "--output", str(out), "--replay-seeds", "3",
                 "--source-trials", "6", "--strategies", "random,cold_tpe,transfer_ensemble,cmaes_warm"]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["a", "b", "c"] and report["max_trials"] == 40 and report["censored_at"] == 41

    table = json.loads(table_file.read_text())
    space = replay_space(GRID)
    lrs, hiddens = sorted(GRID["training.lr"]), sorted(GRID["method.hidden_size"])
    mine = {"top5": [], "top1": []}
    for target in ("a", "b", "c"):
        rows = table["tasks"][target]["configurations"]
        measured = sorted((r["dev"] for r in rows if r["dev"] is not None), reverse=True)
        worst = measured[-1]
        by_point = {(lrs.index(r["params"]["training.lr"]), hiddens.index(r["params"]["method.hidden_size"]),
                     r["params"]["method.rnn"]): worst if r["dev"] is None else r["dev"] for r in rows}
        for seed in range(3):
            study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
            values = []
            for _ in range(40):
                trial = study.ask(space)
                # the replay's numbers are indices into each field's sorted values
                values.append(by_point[trial.params["training.lr"], trial.params["method.hidden_size"],
                                       trial.params["method.rnn"]])
                study.tell(trial, values[-1])
            for name, k in (("top5", 2), ("top1", 1)):
                mine[name].append(next((i for i, v in enumerate(values, 1) if v >= measured[k - 1]), 41))
        assert report["targets"][target]["top5"]["k"] == 2 and report["targets"][target]["top1"]["k"] == 1
        assert report["targets"][target]["top5"]["threshold"] == measured[1]
    assert report["runs"]["random"]["top5"] == mine["top5"] and report["runs"]["random"]["top1"] == mine["top1"]
    assert mine["top5"] != mine["top1"]   # the two thresholds are told apart
    figures = report["strategies"]
    assert figures["random"]["median_top5"] == statistics.median(mine["top5"])
    assert figures["transfer_ensemble"]["median_top5"] < figures["cold_tpe"]["median_top5"]
    assert set(report["per_task"]) == {"a", "b", "c"} and (tmp_path / "replay.png").stat().st_size > 10_000


def test_a_failed_configuration_counts_as_the_worst_and_the_lookup_is_exact(table_file):
    table = json.loads(table_file.read_text())
    lookup = TaskTable(GRID, table["tasks"]["b"])
    worst = min(c["dev"] for c in table["tasks"]["b"]["configurations"] if c["dev"] is not None)
    failed = table["tasks"]["b"]["configurations"][3]["params"]
    as_replayed = {k: sorted(GRID[k]).index(v) if k != "method.rnn" else v for k, v in failed.items()}
    assert lookup(as_replayed) == worst
    study, reached = replay(optuna.samplers.BruteForceSampler(seed=0), lookup, replay_space(GRID), 40)
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


def test_a_field_with_one_grid_value_leaves_warm_started_cma_es_running(tmp_path):
    """CMA-ES models neither choices nor single values; its warm start must hand it trials over the rest."""
    grid = {"training.lr": [1e-4, 1e-3, 1e-2, 1e-1], "method.hidden_size": [64], "method.s_out": [0.5, 1.0, 2.0]}
    rows = lambda shift: [{"params": {"training.lr": lr, "method.hidden_size": 64, "method.s_out": s},   # noqa: E731
                           "dev": -(math.log10(lr) + 2 - shift) ** 2 - s} for lr in grid["training.lr"]
                          for s in grid["method.s_out"]]
    table = {"grid": grid, "tasks": {name: {"mode": "max", "configurations": rows(shift)}
                                     for name, shift in (("a", 0.0), ("b", 0.5))}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    from rayeff.bench.replay import bench_priors_table

    with pytest.raises(UserError, match="warm-started CMA-ES needs at least 10 source trials in all"):
        bench_priors_table(str(tmp_path / "t.json"), str(tmp_path / "o.json"), seeds=2, source_trials=4)
    report = bench_priors_table(str(tmp_path / "t.json"), str(tmp_path / "o.json"), seeds=2, source_trials=10,
                                strategies=("cold_tpe", "cmaes_warm"))
    assert len(report["runs"]["cmaes_warm"]["top1"]) == 4 and report["max_trials"] == 12
