"""Search-space files: the shipped ones load and apply to jobs of their method; bad ones fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from rayeff.errors import UserError
from rayeff.config import load_job
from rayeff.tune.space import check_fields, load_search_space, optuna_distributions

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("method, file", [("full", "full"), ("lora", "lora"), ("read", "read"), ("read", "read-side"),
                                          ("adazeta", "adazeta"), ("mezo", "mezo")])
def test_each_shipped_space_loads_for_its_method(method, file):
    if file == "read-side":   # attention pooling needs a mean-pooled model: checked against such a base job
        space = load_search_space(SPACES / f"{file}.yaml", check=False)
        with pytest.raises(UserError, match="params.method.attention_pooling = True .* set model.pooling: mean"):
            check_fields(space, file)
        check_fields(space, file, load_job(SPACES.parent / "jobs" / "sst2-read.yaml").model_dump(mode="json"))
    else:
        space = load_search_space(SPACES / f"{file}.yaml")
    assert space.method == method and "training.lr" in space.params
    assert set(optuna_distributions(space)) == set(space.params)


def test_adazeta_space_tunes_what_the_issue_names():
    space = load_search_space(SPACES / "adazeta.yaml")
    assert {"method.alpha", "method.beta", "method.q_max", "method.tt_rank", "method.bottleneck", "training.lr",
            "method.eps"} <= set(space.params)


def test_read_side_space_tunes_every_side_network_option_and_the_schedule():
    from rayeff.methods.read import ReadConfig

    space = load_search_space(SPACES / "read-side.yaml", check=False)
    options = set(ReadConfig.model_fields) - {"name", "s_in", "layer_stride"}
    assert {f"method.{o}" for o in options} | {"training.lr_schedule", "training.warmup_ratio"} <= set(space.params)
    assert optuna_distributions(space)["method.bidirectional"] == CategoricalDistribution([False, True])


def test_distributions_follow_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: read\nparams:\n"
                    "  training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                    "  method.hidden_size: {type: int, low: 16, high: 64, step: 16}\n"
                    "  method.rnn: {type: categorical, choices: [gru, lstm]}\n")
    d = optuna_distributions(load_search_space(path))
    assert d["training.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert d["method.hidden_size"] == IntDistribution(16, 64, step=16)
    assert d["method.rnn"] == CategoricalDistribution(["gru", "lstm"])


@pytest.mark.parametrize("body, message", [
    ("method: read\nparams:\n  method.hiden_size: {type: int, low: 1, high: 8}\n",
     "params.method.hiden_size = 1 does not make a valid read job"),
    ("method: read\nparams:\n  method.hidden_size: {type: int, low: 0, high: 8}\n",
     "params.method.hidden_size = 0 does not make a valid read job"),
    ("method: read\nparams:\n  method.rnn: {type: categorical, choices: [gru, transformer]}\n",
     "params.method.rnn = 'transformer'"),
    ("method: read\nparams:\n  training.lr: {type: float, low: 0.0, high: 1.0, log: true}\n",
     "log scale needs low > 0"),
    ("method: read\nparams:\n  training.lr: {type: float, low: 2.0, high: 1.0}\n",
     "the range is empty: low (2.0) must be below high"),
    ("method: read\nparams:\n  training.lr: {type: float, low: 1.0, high: 1.0}\n", "the range is empty"),
    ("method: read\nparams:\n  method.rnn: {type: categorical}\n", "categorical needs a non-empty `choices`"),
    ("method: nope\nparams:\n  training.lr: {type: float, low: 0.1, high: 1.0}\n", "unknown method 'nope'"),
    ("method: read\nparams: {}\n", "params"),
    ("method: [read\n", "not valid YAML"),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=None) as err:
        load_search_space(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_a_missing_search_space_file_is_named():
    with pytest.raises(UserError, match="no such search-space file"):
        load_search_space("search_spaces/none.yaml")
