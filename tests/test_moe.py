"""Mixture-of-Experts: routing, capacity and auxiliary losses against hand-computed cases; upcycling that leaves
every architecture's output unchanged at step 0; native Hugging Face MoE models (Mixtral, Qwen2-MoE, Switch) with
their routers watched; bad MoE settings; through Ray, experts split over 2 workers following 1 worker (and resuming),
and a tiny Mixtral whose loss falls."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml

from rayeff.config import validate_job
from rayeff.errors import UserError
from rayeff.methods.moe import MoEConfig, UpcycleSpec, build, check, upcycle
from rayeff.mixture_of_experts import (
    MoEFeedForward,
    coefficient_of_variation,
    expert_capacity,
    load_balancing_loss,
    moe_layers,
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


@pytest.mark.parametrize("top_k, top1_gate", [(1, "probability"), (1, "straight_through"), (2, "probability")])
def test_the_router_learns_from_the_task_loss_alone(top_k, top1_gate):
    """No auxiliary loss: the router's gradient comes from the task loss through the gates only."""
    torch.manual_seed(0)
    layer = MoEFeedForward([torch.nn.Linear(4, 4) for _ in range(3)], width=4, top_k=top_k, capacity_factor=None,
                           aux_loss_coef=0.0, top1_gate=top1_gate)
    x = torch.randn(2, 5, 4)
    (layer(x) ** 2).sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().min() > 0
    flat = x.reshape(-1, 4)
    probs = torch.softmax(layer.router(flat), dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    if top_k == 1:   # Switch: the expert's output times its probability; straight-through: times 1
        gate = top[:, 0] if top1_gate == "probability" else torch.ones(10)
        expected = torch.stack([gate[i] * layer.experts[int(chosen[i, 0])](flat[i]) for i in range(10)])
        assert torch.allclose(layer(x).reshape(-1, 4), expected, atol=1e-6)


def test_capacity_drops_the_assignments_past_it_first_choices_first():
    assert expert_capacity(4, 2, 1, 1.0) == 2 and expert_capacity(3, 3, 2, 1.0) == 2
    assert expert_capacity(10, 4, 1, None) == 10
    # top-1, capacity 2: the third token sent to expert 0 is dropped
    assert within_capacity(torch.tensor([[0], [0], [0], [1]]), 2, 2).tolist() == [[True], [True], [False], [True]]
    # top-2, capacity 2: the three first choices of expert 0 come before any second choice; token 2's is dropped
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert within_capacity(chosen, 3, 2).tolist() == [[True, True], [True, True], [False, True]]


def _two_workers_route(rank: int, port: int, folder: str) -> None:
    """Worker `rank` of 2 (gloo): the layer with the shipped job's capacity (1.25), E4, on its rows of the global
    batch (rows rank, rank + 2: the loops' interleaving), padding masked."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    hidden, mask, layers = _capacity_case()
    out = {}
    for top_k, layer in layers.items():
        layer.distribute(None)
        layer.token_mask = mask[rank::2]
        out[top_k] = layer(hidden[rank::2]).detach()
        out[f"counts{top_k}"] = torch.tensor(layer.take_counts()[1:])
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def _capacity_case():
    torch.manual_seed(3)
    hidden = torch.randn(4, 9, 6) + torch.tensor([1.0, 0, 0, 0, 0, 0])
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2, [1] * 3 + [0] * 6])
    layers = {}
    for top_k in (1, 2):
        torch.manual_seed(4)
        layers[top_k] = MoEFeedForward([torch.nn.Linear(6, 6) for _ in range(4)], width=6, top_k=top_k,
                                       capacity_factor=1.25)
        with torch.no_grad():   # a router that favours expert 0, so that capacity bites
            layers[top_k].router.weight[0, 0] += 2.0
    return hidden, mask, layers


def test_two_workers_drop_exactly_what_one_worker_drops(tmp_path):
    """Capacity is the global batch's: with the shipped capacity factor, each token's output on 2 workers equals
    its output on 1, and the dropped counts add up (per-worker capacity dropped different tokens)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_workers_route, args=(port, str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    hidden, mask, layers = _capacity_case()
    for top_k, layer in layers.items():
        layer.token_mask = mask
        whole = layer(hidden).detach()
        dropped, assigned = layer.take_counts()[1:]
        assert dropped > 0   # the case exercises capacity
        for rank, part in enumerate(parts):
            assert torch.allclose(part[top_k], whole[rank::2], atol=1e-6)
        assert sum(int(p[f"counts{top_k}"][0]) for p in parts) == dropped
        assert sum(int(p[f"counts{top_k}"][1]) for p in parts) == assigned


def test_a_dropped_token_passes_through_as_zero_and_is_counted():
    layer = MoEFeedForward([torch.nn.Linear(2, 2) for _ in range(2)], width=2, top_k=1, capacity_factor=0.5,
                           top1_gate="straight_through")
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
    layers = upcycle(moe.backbone, UpcycleSpec(experts=4, top_k=top_k, capacity_factor=None,
                                               top1_gate="straight_through"))
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


def _batch_with_padding():
    return {"input_ids": torch.randint(5, 1000, (3, 7)),
            "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])}   # 13 real tokens


def test_padding_is_not_routed():
    torch.manual_seed(0)
    model = build(build_classifier(resolve_model("tiny-bert"), 2),
                  MoEConfig(upcycle=UpcycleSpec(experts=4, top_k=2, capacity_factor=None)))
    layers = moe_layers(model)
    model.train()(**_batch_with_padding())
    assert [sum(layer.take_counts()[0]) for layer in layers] == [26, 26]    # 13 real tokens x top-2


@pytest.mark.parametrize("model_name, routers, top_k", [("tiny-mixtral", 2, 2), ("tiny-qwen2-moe", 2, 2),
                                                        ("tiny-switch", 4, 1)])
def test_native_moe_models_train_their_routers_on_the_auxiliary_losses(model_name, routers, top_k):
    torch.manual_seed(0)
    model = build(build_classifier(resolve_model(model_name), 2), MoEConfig(z_loss_coef=0.001))
    layers = moe_layers(model)
    assert len(layers) == routers and all(layer.num_experts == 4 and layer.top_k == top_k for layer in layers)
    model.train()
    logits = model(**_batch_with_padding())
    load, dropped, assigned = layers[0].take_counts()
    assert sum(load) == assigned == 13 * top_k and dropped == 0
    assert 1.0 <= layers[0].aux_loss.item() < 4.0 and layers[0].z_loss.item() > 0
    (logits.sum() + sum(layer.loss_term() for layer in layers)).backward()
    router = next(p for n, p in model.named_parameters() if n.endswith(("gate.weight", "router.classifier.weight")))
    assert router.grad is not None and router.grad.abs().sum() > 0
    # every expert has a gradient, zero if no token chose it (data-parallel workers reduce the same tensors)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)
    assert logits.shape == (3, 2)
    figures = parameter_figures(model)
    assert figures["total_params"] == sum(p.numel() for p in model.parameters())
    assert figures["flops_ratio_to_dense"] > 1.1 if top_k == 2 else \
        figures["flops_ratio_to_dense"] == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("trainable", ["experts", "lora"])
def test_native_moe_can_train_only_its_experts_or_lora_on_them(trainable):
    classifier, batch = build_classifier(resolve_model("tiny-mixtral"), 2).eval(), _batch_with_padding()
    with torch.no_grad():
        plain = classifier(**batch)
    model = build(classifier, MoEConfig(trainable=trainable, freeze_router=True, lora={"rank": 4}))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".gate." in n or "self_attn" in n or "embed" in n for n in names)
    assert any(n.startswith("head.") for n in names)
    experts = {n for n in names if ".experts." in n}
    if trainable == "experts":
        assert experts == {f"backbone.layers.{i}.mlp.experts.{w}" for i in (0, 1)
                           for w in ("gate_up_proj", "down_proj")}
    else:
        assert experts and all("lora_" in n for n in experts)
        with torch.no_grad():
            before = model.eval()(**batch)
        # LoRA's B starts at zero: the model is unchanged until trained
        assert torch.allclose(before, plain, rtol=0, atol=1e-6)


def test_a_native_moe_model_is_not_upcycled_and_a_dense_one_must_be():
    with pytest.raises(UserError, match="method.upcycle: mixtral has Mixture-of-Experts blocks already"):
        check(MoEConfig(upcycle=UpcycleSpec(experts=2)), backbone_skeleton(resolve_model("tiny-mixtral")))
    with pytest.raises(UserError, match="method.upcycle: bert has no Mixture-of-Experts blocks"):
        check(MoEConfig(), backbone_skeleton(resolve_model("tiny-bert")))


JOB = {"model": {"name": "tiny-bert"}, "data": {"task": "sst2"},
       "method": {"name": "moe", "upcycle": {"experts": 4, "top_k": 1}}}


@pytest.mark.parametrize("change, says", [
    ({"method": {"name": "moe", "upcycle": {"experts": 2, "top_k": 3}}}, "top_k (3) must not exceed experts (2)"),
    ({"method": {"name": "moe", "upcycle": {"experts": 1}}}, "method.upcycle.experts"),
    ({"deepspeed": {"zero_stage": 3}}, "method moe supports ZeRO stages 0, 1 and 2"),
    ({"method": {"name": "moe", "upcycle": {"experts": 3}, "expert_parallel": True},
      "scaling": {"num_workers": 2}, "deepspeed": {"zero_stage": 1}}, "3 experts cannot be split evenly over"),
    ({"method": {"name": "moe", "upcycle": {"experts": 4}, "expert_parallel": True}},
     "expert_parallel needs ZeRO stage 1 or 2"),
    ({"method": {"name": "moe", "upcycle": {"experts": 4}, "expert_parallel": True},
      "deepspeed": {"zero_stage": 1, "precision": "bf16"}}, "expert_parallel trains in fp32 only"),
    ({"method": {"name": "moe", "expert_parallel": True}, "deepspeed": {"zero_stage": 1}},
     "experts are split over workers for upcycled layers only"),
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
def test_experts_split_over_two_workers_follow_one_worker_resume_and_report_moe_figures(tmp_path, glue_dir,
                                                                                        local_ray):
    """Expert parallelism: 2 workers holding 2 of the 4 experts each give the 1-worker loss curve (global batch,
    no capacity limit), also when stopped after 2 steps and resumed; the result carries the MoE figures."""
    from safetensors.torch import load_file

    from rayeff.train.runner import run_in_process, run_job

    def job(name, workers, **changes):
        return validate_job({
            "model": {"name": "tiny-bert", "dropout": 0.0},
            "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "eval_subset": 32},
            "method": {"name": "moe", "expert_parallel": True, "aux_loss_coef": 0.1, "z_loss_coef": 0.01,
                       "upcycle": {"experts": 4, "top_k": 2, "noise": 0.05, "capacity_factor": 1.25}},
            "training": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "eval_every": 4, "log_every": 2,
                         "max_grad_norm": 1.0},
            "scaling": {"num_workers": workers}, "deepspeed": {"zero_stage": 1}, "output_dir": str(tmp_path / name),
            **changes})

    one = run_in_process(job("ep1", 1))   # the same loop, one worker, no Ray
    stopped = run_job(job("ep2", 2, energy={"budget_j": 1e-9}), show_progress=False)
    assert stopped["status"] == "stopped: energy budget" and stopped["time"]["steps"] == 2
    two = run_job(job("ep2", 2, resume=True), show_progress=False)
    assert two["status"] == "finished" and len(two["step_losses"]) == 6
    for step, (a, b) in enumerate(zip(one["step_losses"], two["step_losses"])):
        assert abs(a - b) / abs(a) < 1e-4, (step, a, b)
    assert one["loss_history"][-1] != one["loss_history"][0]
    moe = two["moe"]
    assert moe["total_params"] == one["moe"]["total_params"] > moe["dense_params"]
    assert two["memory"]["param_bytes"] < one["memory"]["param_bytes"]   # each worker holds half the experts
    assert [r["step"] for r in moe["routing"]] == [0, 2, 4, 6]      # step 0, the stop, the evaluation, the end
    assert moe["routing"][0]["layers"][0]["load"] == one["moe"]["routing"][0]["layers"][0]["load"]
    assert all(0.0 <= r["dropped_fraction"] < 1.0 and r["load_cv"] >= 0.0 for r in moe["routing"])
    a, b = (load_file(str(tmp_path / name / "final" / "trainable.safetensors")) for name in ("ep1", "ep2"))
    assert set(a) == set(b) and any(".experts.3." in k for k in b)    # every expert, under its unsplit name
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_a_tiny_mixtral_fine_tunes_and_its_loss_falls(tmp_path, glue_dir):
    from rayeff.train.runner import run_in_process

    result = run_in_process(validate_job({
        "model": {"name": "tiny-mixtral", "dropout": 0.0},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 32},
        "method": {"name": "moe", "aux_loss_coef": 0.02, "z_loss_coef": 0.001},
        "training": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "log_every": 4},
        "output_dir": str(tmp_path / "mixtral")}))
    losses = result["step_losses"]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert result["moe"]["total_params"] == result["memory"]["total_params"]
    assert [r["step"] for r in result["moe"]["routing"]] == [0, 24]
    assert all(len(layer["load"]) == 4 for layer in result["moe"]["routing"][-1]["layers"])


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
