"""Every registered method keeps one contract (rayeff/methods/registry.py), checked the same way on every tiny
backbone it supports, in process (no Ray): it builds, trains two steps through its loop, reports its trainable
parameters, checkpoints, and a resumed run reloads the checkpointed weights exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rayeff.config import validate_job
from rayeff.methods import METHODS, MethodDefinition, get_method, register_method, trainable_parameter_count
from rayeff.models import build_classifier, resolve_model
from rayeff.train.runner import run_in_process

DENSE = ("tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama")
SPECS = {   # the smallest config of each method; moe upcycles dense backbones and watches a native MoE's routers
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 2},
    "read": {"name": "read", "hidden_size": 4},
    "adazeta": {"name": "adazeta", "bottleneck": 4, "tt_rank": 2, "q_target": None, "beta": 0.0, "alpha": 2,
                "q_max": 2},
    "mezo": {"name": "mezo"},
    "moe": {"name": "moe", "upcycle": {"experts": 2}},
}
CASES = [(name, model) for name in SPECS for model in DENSE] + [("moe", "tiny-mixtral")]


def test_every_registered_method_is_in_the_contract_test():
    assert set(METHODS) == set(SPECS)


def job(tmp_path, glue_dir, method: str, model: str, name: str, **changes):
    spec = {"name": "moe"} if model == "tiny-mixtral" else SPECS[method]
    return validate_job({
        "model": {"name": model, "dropout": 0.0},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 8, "eval_subset": 8},
        "method": spec, "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1,
                                     "checkpoint_every": 1, "max_seq_length": 32},
        "energy": {"meter": "estimate"}, "output_dir": str(tmp_path / name), **changes})


@pytest.mark.parametrize("method,model", CASES)
def test_a_method_builds_trains_reports_checkpoints_and_reloads(tmp_path, glue_dir, method, model):
    trained = run_in_process(job(tmp_path, glue_dir, method, model, "run"))
    assert trained["status"] == "finished" and trained["method"] == method and len(trained["step_losses"]) == 2
    definition = get_method(method)
    torch.manual_seed(0)
    built = definition.build(build_classifier(resolve_model(model), 2, 0.0), job(tmp_path, glue_dir, method, model,
                                                                                   "x").method)
    assert trained["memory"]["trainable_params"] == trainable_parameter_count(built) > 0
    weights = load_file(trained["weights"])
    assert sum(t.numel() for t in weights.values()) == trained["memory"]["trainable_params"]
    assert (definition.figures is not None) == ("method_figures" in trained)
    assert (definition.routing is not None) == ("moe" in trained)
    # Resumed at its last step, the run only reloads, evaluates and writes its final weights: those it saved.
    resumed = run_in_process(job(tmp_path, glue_dir, method, model, "run", resume=True))
    assert resumed["time"]["steps"] == 2 and resumed["step_losses"] == trained["step_losses"]
    reloaded = load_file(resumed["weights"])
    assert reloaded.keys() == weights.keys() and all(torch.equal(reloaded[k], weights[k]) for k in weights)
    assert resumed["metrics"] == trained["metrics"]


def test_a_second_method_of_the_same_name_is_refused():
    with pytest.raises(ValueError, match="a method named 'full' is registered already"):
        register_method(MethodDefinition("full", METHODS["full"].config, METHODS["full"].build, loop="first_order"))
    assert METHODS["full"].loop == "first_order"


def test_a_method_names_a_loop_that_exists():
    with pytest.raises(ValueError, match="loop 'second_order' is not one of first_order, zeroth_order"):
        MethodDefinition("newton", METHODS["full"].config, METHODS["full"].build, loop="second_order")
