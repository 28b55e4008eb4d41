"""Mixture-of-Experts: routing, capacity and auxiliary losses against hand-computed cases; upcycling that leaves
every architecture's output unchanged at step 0; bad MoE settings; an upcycled run through Ray with its figures."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from rayeff.config import validate_job
from rayeff.errors import UserError
from rayeff.methods.moe import MoEConfig, UpcycleSpec, check, upcycle
from rayeff.mixture_of_experts import (
    MoEFeedForward,
    coefficient_of_variation,
    expert_capacity,
    load_balancing_loss,
    parameter_figures,
    router_z_loss,
    top_k_routing,
    within_capacity,
)
from rayeff.models import backbone_skeleton, build_classifier, resolve_model


def test_top_k_weights_are_the_chosen_probabilities_renormalised():
    probs, experts, weights = top_k_routing(torch.log(torch.tensor([[1.0, 2.0, 3.0]])), k=2)
    assert torch.allclose(probs, torch.tensor([[1 / 6, 2 / 6, 3 / 6]]))
    assert experts.tolist() == [[2, 1]]
    assert torch.allclose(weights, torch.tensor([[3 / 5, 2 / 5]]))


def test_capacity_drops_the_assignments_past_it_first_choices_first():
    assert expert_capacity(4, 2, 1, 1.0) == 2 and expert_capacity(3, 3, 2, 1.0) == 2
    assert expert_capacity(10, 4, 1, None) == 10
    # top-1, capacity 2: the third token sent to expert 0 is dropped
    assert within_capacity(torch.tensor([[0], [0], [0], [1]]), 2, 2).tolist() == [[True], [True], [False], [True]]
    # top-2, capacity 2: the three first choices of expert 0 come before any second choice; token 2's is dropped
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert within_capacity(chosen, 3, 2).tolist() == [[True, True], [True, True], [False, True]]


def test_a_dropped_token_passes_through_as_zero_and_is_counted():
    layer = MoEFeedForward([torch.nn.Linear(2, 2) for _ in range(2)], width=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))   # positive first feature -> expert 0
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]]])  # capacity ceil(0.5*4/2) = 1
    y = layer(x)
    assert torch.equal(y[0, 1], torch.zeros(2)) and torch.equal(y[0, 3], torch.zeros(2))
    assert torch.allclose(y[0, 0], layer.experts[0](x[0, 0])) and torch.allclose(y[0, 2], layer.experts[1](x[0, 2]))
    assert layer.take_counts() == ([2, 2], 2, 4)
    assert layer.take_counts() == ([0, 0], 0, 0)


def test_an_expert_without_tokens_gets_a_zero_gradient_not_none():
    """Data-parallel workers all-reduce every expert's gradient, whichever experts their own batch used."""
    layer = MoEFeedForward([torch.nn.Linear(2, 2) for _ in range(2)], width=2, top_k=1, capacity_factor=None)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))   # every token here -> expert 0
    layer(torch.tensor([[[1.0, 0.5], [2.0, -1.0]]])).sum().backward()
    unused = layer.experts[1].weight.grad
    assert unused is not None and torch.equal(unused, torch.zeros(2, 2))
    assert layer.experts[0].weight.grad.abs().sum() > 0


def test_the_load_balancing_loss_is_minimal_for_balanced_routing():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(uniform, balanced, 4).item() == pytest.approx(1.0)
    peaked = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    assert load_balancing_loss(peaked, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(4 * 0.7)
    assert load_balancing_loss(peaked, balanced, 4).item() == pytest.approx(1.0)   # balanced assignments: 1 again
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2)
    assert coefficient_of_variation([5, 5, 5, 5]) == 0.0 and coefficient_of_variation([20, 0, 0, 0]) == \
        pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycling_with_identical_experts_keeps_the_dense_output(model, top_k):
    torch.manual_seed(0)
    dense = build_classifier(resolve_model(model), num_labels=2).eval()
    moe = copy.deepcopy(dense)
    layers = upcycle(moe.backbone, UpcycleSpec(experts=4, top_k=top_k, capacity_factor=None))
    assert len(layers) == (4 if model == "tiny-t5" else 2)   # T5: encoder and decoder blocks
    moe.eval()
    batch = {"input_ids": torch.randint(5, 1000, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(moe(**batch), dense(**batch), atol=1e-6, rtol=0)
    figures = parameter_figures(moe)
    assert figures["dense_params"] == sum(p.numel() for p in dense.parameters())
    assert figures["flops_ratio_to_dense"] > 1.0 if top_k == 2 else \
        figures["flops_ratio_to_dense"] == pytest.approx(1.0, rel=0.1)


def test_every_and_noise_choose_and_perturb_the_experts():
    torch.manual_seed(0)
    backbone = build_classifier(resolve_model("tiny-bert"), 2).backbone
    layers = upcycle(backbone, UpcycleSpec(experts=2, every=2, noise=0.1))
    assert len(layers) == 1 and layers[0] is backbone.encoder.layer[1].intermediate
    first, second = (dict(e.named_parameters()) for e in layers[0].experts)
    assert not torch.equal(first["0.dense.weight"], second["0.dense.weight"])
    with pytest.raises(UserError, match=r"method.upcycle.every: 3 selects none of the backbone's 2"):
        check(MoEConfig(upcycle=UpcycleSpec(experts=2, every=3)), backbone_skeleton(resolve_model("tiny-bert")))


JOB = {"model": {"name": "tiny-bert"}, "data": {"task": "sst2"},
       "method": {"name": "moe", "upcycle": {"experts": 4, "top_k": 1}}}


@pytest.mark.parametrize("change, says", [
    ({"method": {"name": "moe", "upcycle": {"experts": 2, "top_k": 3}}}, "top_k (3) must not exceed experts (2)"),
    ({"method": {"name": "moe", "upcycle": {"experts": 1}}}, "method.upcycle.experts"),
    ({"deepspeed": {"zero_stage": 3}}, "method moe supports ZeRO stages 0, 1 and 2"),
])
def test_bad_moe_settings_are_one_line_errors(change, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        validate_job({**JOB, **change})


def test_an_every_that_selects_no_block_stops_the_cli_before_ray(tmp_path, glue_dir):
    from rayeff.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "method": {"name": "moe", "upcycle": {"experts": 2, "every": 5}}}))
    assert main(["run", str(job), "--data-dir", str(glue_dir), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_upcycled_run_reports_its_moe_figures(tmp_path, glue_dir, local_ray):
    from rayeff.train.runner import run_job

    raw = {**JOB, "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "eval_subset": 32},
           "training": {"max_steps": 8, "batch_size": 8, "lr": 1e-3, "eval_every": 4, "log_every": 4},
           "output_dir": str(tmp_path / "moe")}
    result = run_job(validate_job(raw), show_progress=False)
    moe = result["moe"]
    assert moe["flops_ratio_to_dense"] == pytest.approx(1.0, rel=0.1) and moe["total_params"] > moe["dense_params"]
    assert [r["step"] for r in moe["routing"]] == [0, 4, 8]      # step 0, each evaluation, the end
    first = moe["routing"][0]["layers"][0]
    assert len(first["load"]) == 4 and sum(first["load"]) > 0 and sum(first["load"]) % 8 == 0   # 8 padded rows
    assert all(0.0 <= r["dropped_fraction"] < 1.0 and r["load_cv"] >= 0.0 for r in moe["routing"])
    assert json.loads((tmp_path / "moe" / "result.json").read_text())["moe"]["routing"] == moe["routing"]


def test_bench_moe_runs_dense_and_each_upcycling_of_the_same_job(tmp_path):
    from rayeff.bench.moe import moe_jobs

    job = validate_job({**JOB, "method": {"name": "moe", "aux_loss_coef": 0.1,
                                          "upcycle": {"experts": 2, "every": 2, "capacity_factor": None}}})
    jobs = moe_jobs(job, [4, 8], [1, 2], tmp_path)
    assert list(jobs) == ["dense", "moe-e4-k1", "moe-e4-k2", "moe-e8-k1", "moe-e8-k2"]
    assert jobs["dense"].method.name == "full" and jobs["dense"].training == job.training
    m = jobs["moe-e8-k2"].method
    assert (m.upcycle.experts, m.upcycle.top_k, m.upcycle.every, m.upcycle.capacity_factor, m.aux_loss_coef) == \
        (8, 2, 2, None, 0.1)
    assert jobs["moe-e4-k1"].output_dir == str(tmp_path / "moe-e4-k1")
    from_dense = moe_jobs(validate_job({**JOB, "method": {"name": "full"}}), [4], [1], tmp_path)
    assert from_dense["moe-e4-k1"].method.upcycle == UpcycleSpec(experts=4, top_k=1)
