"""The prior store and the sources a sweep with priors learns from, without Ray: distances, the nearest sweeps,
stored trials as Optuna trials."""

from __future__ import annotations

import optuna
import pytest

from rayeff.errors import UserError
from rayeff.tune.priors import PriorStore, best_trials, distance, nearest_sweeps, source_task
from rayeff.tune.space import SearchSpace

SPACE = SearchSpace.model_validate({"method": "read", "params": {
    "training.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "method.hidden_size": {"type": "int", "low": 16, "high": 512, "log": True},
    "method.s_out": {"type": "float", "low": 0.0, "high": 4.0},
    "method.rnn": {"type": "categorical", "choices": ["gru", "lstm"]},
}})


def setting(**changes) -> dict:
    return {"task": "sst2", "task_type": "classification", "input": "single", "num_labels": 2, "train_size": 1000,
            "model": "minilm-l6", "model_family": "bert", "model_params": 22_000_000, "method": "read", **changes}


def trials(*pairs) -> list[dict]:
    return [{"params": {"training.lr": lr, "method.hidden_size": 64, "method.rnn": "gru"}, "objectives": [acc],
             "feasible": True, "status": "finished"} for lr, acc in pairs]


def test_distance_counts_mismatches_and_decades():
    assert distance(setting(), setting()) == 0
    assert distance(setting(), setting(task="qnli", input="pair")) == pytest.approx(0.5)
    assert distance(setting(), setting(train_size=100_000)) == pytest.approx(2.0)
    assert distance(setting(), setting(task_type="regression", num_labels=1, model_family="gpt2")) == 2.5


def test_the_store_keeps_sweeps_and_the_nearest_become_sources(tmp_path):
    store = PriorStore(tmp_path / "priors.db")
    space = SPACE.model_dump(mode="json")
    far = store.add("far", setting(task="stsb", task_type="regression", num_labels=1, train_size=100_000),
                    [{"metric": "dev", "mode": "max"}], space, trials((5e-2, 0.9)))
    near = store.add("near", setting(task="qnli", input="pair"), [{"metric": "dev", "mode": "max"}], space,
                     trials((2e-3, 0.8), (1e-2, 0.7), (3e-4, 0.6), (1e-1, 0.5)))
    store.add("other-method", setting(method="lora"), [{"metric": "dev", "mode": "max"}], {}, trials((1e-4, 0.99)))
    assert [e["name"] for e in store.entries()] == ["far", "near", "other-method"]
    assert [t["objectives"][0] for t in best_trials(store.entry(near), 2)] == [0.8, 0.7]

    chosen = nearest_sweeps(store, setting(task="rte", input="pair"), max_sweeps=1)
    assert [(d, e["id"]) for d, e in chosen] == [(0.0, near)]
    both = nearest_sweeps(store, setting(task="rte", input="pair"), max_sweeps=5)
    assert [e["name"] for _, e in both] == ["near", "far"]   # same method only, nearest first

    store.add("near", setting(), [{"metric": "dev", "mode": "max"}], {}, trials((1e-3, 0.5)))  # replaced, not added
    assert [e["name"] for e in store.entries()] == ["far", "other-method", "near"]


def test_a_stored_sweep_becomes_a_source_of_its_feasible_trials_inside_its_space(tmp_path):
    store = PriorStore(tmp_path / "priors.db")
    rows = trials((2e-3, 0.8), (1e-2, 0.7), (3e-4, 0.6), (0.5, 0.9))   # 0.5: outside the stored space's lr range
    rows[2] = {**rows[2], "feasible": False}
    rows.append({**rows[0], "status": "stopped: asha"})
    entry = store.entry(store.add("runs/sweep-q", setting(task="qnli"), [{"metric": "eval_loss", "mode": "min"}],
                                  SPACE.model_dump(mode="json"), rows))
    source = source_task(entry)
    assert source.name == "runs/sweep-q" and source.descriptors["task"] == "qnli"
    assert source.direction == optuna.study.StudyDirection.MINIMIZE
    assert [(t.params["training.lr"], t.value) for t in source.trials] == [(2e-3, 0.8), (1e-2, 0.7)]
    assert source.trials[0].distributions["training.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-1,
                                                                                                   log=True)


def test_a_missing_or_foreign_store_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="does not exist; finish a sweep first"):
        PriorStore(tmp_path / "none.db").entries()
    foreign = tmp_path / "foreign.db"
    foreign.write_text("not sqlite at all " * 100)
    with pytest.raises(UserError, match="is not a rayeff prior store"):
        PriorStore(foreign).entries()
    store = PriorStore(tmp_path / "p.db")
    store.add("x", setting(), [{"metric": "dev", "mode": "max"}], {}, [])
    with pytest.raises(UserError, match="no sweep 7"):
        store.entry(7)


def test_the_benchmark_counts_trials_to_the_first_that_reaches_the_target():
    from rayeff.bench.priors import trials_to_target

    assert trials_to_target([0.5, None, 0.8, 0.9], 0.79) == 3
    assert trials_to_target([0.5, None], 0.79) is None


def test_the_benchmark_refuses_a_target_that_is_also_a_source(tmp_path):
    from rayeff.bench.priors import bench_priors

    with pytest.raises(UserError, match=r"--targets: \['sst2'\] are also sources"):
        bench_priors("jobs/sweep-bench-priors.yaml", ["sst2"], ["sst2", "stsb"], [0, 1, 2], str(tmp_path / "o.json"))
    assert not (tmp_path / "o").exists()


def test_priors_list_show_and_remove_through_the_cli(tmp_path, capsys):
    import json

    from rayeff.cli import main

    store = tmp_path / "priors.db"
    PriorStore(store).add("runs/sweep-a", setting(), [{"metric": "dev", "mode": "max"}], {}, trials((1e-3, 0.81)))
    assert main(["priors", "list", "--store", str(store)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("1  ") and "read" in line and "sst2" in line and "best dev 0.81" in line
    assert main(["priors", "show", "1", "--store", str(store)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "runs/sweep-a" and shown["trials"][0]["params"]["training.lr"] == 1e-3
    assert main(["priors", "show", "2", "--store", str(store)]) == 2
    assert "no sweep 2" in capsys.readouterr().err
    assert main(["priors", "list", "--store", str(tmp_path / "none.db")]) == 2
    capsys.readouterr()
    PriorStore(store).add("runs/sweep-b", setting(), [{"metric": "dev", "mode": "max"}], {}, trials((3e-3, 0.7)))
    assert main(["priors", "remove", "1", "--store", str(store)]) == 0
    assert capsys.readouterr().out.strip() == f"rayeff: removed sweep 1 (runs/sweep-a) from {store}"
    assert [e["name"] for e in PriorStore(store).entries()] == ["runs/sweep-b"]
    assert main(["priors", "remove", "1", "--store", str(store)]) == 2
    assert "no sweep 1" in capsys.readouterr().err
