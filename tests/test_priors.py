"""The prior store and the warm start taken from it, without Ray: distances, mapping into a space, narrowing."""

from __future__ import annotations

import math

import pytest

from rayeff.errors import UserError
from rayeff.tune.priors import PriorStore, best_trials, distance, fit_into, narrowed, warm_start
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


def test_prior_parameters_are_clipped_rounded_and_filtered_into_the_space():
    got = fit_into({"training.lr": 0.5, "method.hidden_size": 700.4, "method.rnn": "rnn", "method.other": 3}, SPACE)
    assert got == {"training.lr": 0.1, "method.hidden_size": 512}
    assert fit_into({"method.hidden_size": 99.6, "method.rnn": "lstm"}, SPACE) == {"method.hidden_size": 100,
                                                                                  "method.rnn": "lstm"}


def test_narrowing_spans_the_good_trials_with_a_margin_inside_the_original_range():
    space = narrowed(SPACE, [{"training.lr": 1e-3, "method.s_out": 1.0}, {"training.lr": 4e-3, "method.s_out": 2.0}])
    lr, s_out = space.params["training.lr"], space.params["method.s_out"]
    assert (lr.low, lr.high, lr.log) == (pytest.approx(5e-4), pytest.approx(8e-3), True)
    assert (s_out.low, s_out.high) == (pytest.approx(0.6), pytest.approx(2.4))
    assert space.params["method.hidden_size"] == SPACE.params["method.hidden_size"]  # no prior value: unchanged
    assert space.params["method.rnn"] == SPACE.params["method.rnn"]
    edge = narrowed(SPACE, [{"training.lr": 0.09}]).params["training.lr"]
    assert edge.high == 0.1 and math.isclose(edge.low, 0.045)


def test_the_store_keeps_sweeps_and_warm_starts_from_the_nearest(tmp_path):
    store = PriorStore(tmp_path / "priors.db")
    far = store.add("far", setting(task="stsb", task_type="regression", num_labels=1, train_size=100_000),
                    [{"metric": "dev", "mode": "max"}], {}, trials((5e-2, 0.9)))
    near = store.add("near", setting(task="qnli", input="pair"), [{"metric": "dev", "mode": "max"}], {},
                     trials((2e-3, 0.8), (1e-2, 0.7), (3e-4, 0.6), (1e-1, 0.5)))
    store.add("other-method", setting(method="lora"), [{"metric": "dev", "mode": "max"}], {}, trials((1e-4, 0.99)))
    assert [e["name"] for e in store.entries()] == ["far", "near", "other-method"]
    assert [t["objectives"][0] for t in best_trials(store.entry(near), 2)] == [0.8, 0.7]

    space, first, used = warm_start(store, setting(task="rte", input="pair"), SPACE, max_sweeps=1, top_trials=2,
                                    narrow=True)
    assert [s["name"] for s in used["sweeps"]] == ["near"] and used["sweeps"][0]["distance"] == 0
    assert [f["params"]["training.lr"] for f in first] == [2e-3, 1e-2] and {f["prior"] for f in first} == {near}
    assert space.params["training.lr"].low == pytest.approx(1e-3) and space.params["training.lr"].high == 2e-2
    _, both, used = warm_start(store, setting(task="rte", input="pair"), SPACE, 2, 1, narrow=False)
    assert [s["name"] for s in used["sweeps"]] == ["near", "far"] and used["narrowed_space"] is None
    assert [f["prior"] for f in both] == [near, far]

    store.add("near", setting(), [{"metric": "dev", "mode": "max"}], {}, trials((1e-3, 0.5)))  # replaced, not added
    assert [e["name"] for e in store.entries()] == ["far", "other-method", "near"]


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


def test_priors_list_and_show_through_the_cli(tmp_path, capsys):
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
