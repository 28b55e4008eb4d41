"""Tensor-train layers, TT adapters and the SPSA machinery, in this process (no Ray): exactness, identities, and the
ZO estimate against autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from rayeff.config import validate_job
from rayeff.errors import UserError
from rayeff.methods import get_method, trainable_parameter_count
from rayeff.methods.adazeta import AdaZetaConfig
from rayeff.methods.mezo import MezoConfig
from rayeff.models import build_classifier, resolve_model
from rayeff.tensor_train import TTLinear, dense_flops, factorize
from rayeff.train.query_batch import BatchedLosses, auto_query_batch, busiest_worker_queries, query_groups
from rayeff.train.spsa import MAX_QUERIES, Perturber, QuerySchedule, derived_beta, queries_at, query_seed
from rayeff.train.zeroth_order import AutocastForward, cast_frozen

# -- tensor-train layer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, modes", [(384, [8, 8, 6]), (768, [12, 8, 8]), (4096, [16, 16, 16]), (2, [2]),
                                      (97, [97]), (1, [1])])
def test_factorize_into_balanced_small_modes(n, modes):
    assert factorize(n) == modes and math.prod(modes) == n


@pytest.mark.parametrize("shape", [(384, 64), (64, 384), (12, 10), (30, 7)])
@pytest.mark.parametrize("batch", [(1,), (5,), (2, 3), ()])
def test_tt_linear_equals_its_dense_matrix(shape, batch):
    torch.manual_seed(0)
    layer = TTLinear(*shape, rank=4)
    nn.init.normal_(layer.bias)
    x = torch.randn(*batch, shape[0])
    y = layer(x)
    assert y.shape == (*batch, shape[1])
    expected = x @ layer.dense_weight() + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_tt_linear_with_explicit_modes_and_counts():
    layer = TTLinear(4096, 64, rank=5, in_modes=[16, 16, 16], out_modes=[4, 4, 4], bias=False)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 16, 5), (5, 16, 5), (5, 16, 5), (5, 4, 5), (5, 4, 5),
                                                     (5, 4, 1)]
    assert layer.parameter_count() == 80 + 400 + 400 + 100 + 100 + 20
    assert layer.parameter_count() < 4096 * 64 / 100
    # merging the halves: A (16*5*16*5 + 256*5*16*5), B (20*5*4*5 + 80*5*4*1); then 5 * (4096 + 64) per row
    assert layer.flops(tokens=1) == 2 * (6400 + 102400 + 2000 + 1600 + 5 * (4096 + 64))
    assert layer.flops(tokens=64) < dense_flops(4096, 64, tokens=64) / 10
    with pytest.raises(ValueError, match="multiply to"):
        TTLinear(100, 10, in_modes=[3, 3])


def test_zero_last_core_starts_at_zero_and_init_scale_is_dense_like():
    torch.manual_seed(0)
    assert torch.count_nonzero(TTLinear(384, 64, zero_last_core=True).dense_weight()) == 0
    w = TTLinear(384, 384, rank=5).dense_weight()
    assert 0.5 < w.std().item() * math.sqrt(384) < 2.0


# -- adapters ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, adapters", [("tiny-bert", 4), ("tiny-t5", 10), ("tiny-gpt2", 2), ("tiny-llama", 2)])
def test_adapters_start_as_the_identity(name, adapters):
    torch.manual_seed(0)
    classifier = build_classifier(resolve_model(name), 2, head="linear").eval()
    batch = {"input_ids": torch.randint(5, 100, (1, 9)), "attention_mask": torch.ones(1, 9, dtype=torch.long)}
    with torch.no_grad():
        before = classifier(**batch)
        model = get_method("adazeta").build(classifier, AdaZetaConfig())
        after = model(**batch)
    assert len(model.adapters) == adapters
    assert torch.equal(before, after)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("adapters.") or n.startswith("classifier.head.") for n in trainable)


def test_adapter_placement_and_sizes_follow_the_config():
    classifier = build_classifier(resolve_model("tiny-bert"), 2, head="linear")
    ffn_only = get_method("adazeta").build(classifier, AdaZetaConfig(placement="ffn", bottleneck=8, tt_rank=2))
    assert len(ffn_only.adapters) == 2 and all("attention" not in k for k in ffn_only.adapters)
    adapter = next(iter(ffn_only.adapters.values()))
    assert adapter.down.out_features == 8 and adapter.down.rank == 2


def test_adapters_and_head_stay_float32_when_the_backbone_is_bf16():
    torch.manual_seed(0)
    model = get_method("adazeta").build(build_classifier(resolve_model("tiny-bert"), 2, head="linear"),
                                        AdaZetaConfig()).eval()
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    with torch.no_grad():
        float32_logits = model(**batch)
    cast_frozen(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.startswith(("adapters.", "classifier.head.")))
    assert dtypes["classifier.backbone.encoder.layer.0.attention.self.query.weight"] == torch.bfloat16
    assert dtypes["classifier.backbone.encoder.layer.0.output.LayerNorm.weight"] == torch.float32
    with torch.no_grad():
        logits = AutocastForward(model, torch.bfloat16)(**batch)
    # the same function as the float32 model, within bf16 matrix products' error (not merely finite)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, float32_logits, rtol=0, atol=0.05)
    assert not torch.equal(logits, float32_logits)   # the products did run in bf16


@pytest.mark.parametrize("method", ["adazeta", "mezo-lora"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_spsa_difference_survives_a_bf16_backbone(method, seed):
    """The trained parameters (TT adapters, or LoRA factors) perturbed by eps = 1e-3, the head left alone: on a bf16
    backbone L(+) - L(-) is what the float32 model gives, within the bf16 matrix products' error (measured over
    these seeds: at most 5% for adazeta, 14% for MeZO-LoRA; before, bf16 rounding gave other signs)."""
    trained = ".adapters." if method == "adazeta" else "lora_"

    def projected_gradient(model: nn.Module) -> float:
        perturber = Perturber([p for n, p in model.named_parameters() if trained in f".{n}"])
        perturber.begin_step()
        losses = []
        for sign in (+1, -1):
            perturber.set(seed, sign, 1e-3)
            with torch.no_grad():
                losses.append(F.cross_entropy(model(**batch).float(), labels).item())
        perturber.restore()
        return (losses[0] - losses[1]) / 2e-3

    def build(dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        config = AdaZetaConfig() if method == "adazeta" else MezoConfig(target="lora")
        model = get_method(config.name).build(build_classifier(resolve_model("tiny-bert"), 2, head="linear"),
                                              config).eval()
        cast_frozen(model, dtype)
        return model if dtype == torch.float32 else AutocastForward(model, dtype)

    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(5, 1000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    labels = torch.tensor([0, 1, 0, 1])
    full, half = projected_gradient(build(torch.float32)), projected_gradient(build(torch.bfloat16))
    assert half != 0.0 and half == pytest.approx(full, rel=0.2)


# -- SPSA --------------------------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))


def spsa_estimate(params, loss, queries: int, eps: float) -> torch.Tensor:
    """Average of g_q z_q over `queries` seeds (flat, in the parameters' order), from the regenerated directions."""
    perturber = Perturber(params)
    perturber.begin_step()
    total = torch.zeros_like(perturber.flat)
    for q in range(queries):
        seed = query_seed(0, 0, q)
        perturber.set(seed, +1, eps)
        plus = loss()
        perturber.set(seed, -1, eps)
        minus = loss()
        total.add_(perturber.direction(seed), alpha=(plus - minus) / (2 * eps) / queries)
    perturber.restore()
    return total


def test_spsa_matches_the_gradient_direction_on_a_quadratic():
    torch.manual_seed(0)
    d = 40
    a = torch.randn(d, d, dtype=torch.float64)
    a = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(d, dtype=torch.float64))

    def loss():
        with torch.no_grad():
            return float(0.5 * theta @ a @ theta - b @ theta)

    exact = a @ theta.detach() - b
    estimate = spsa_estimate([theta], loss, queries=4000, eps=1e-4)
    assert cosine(estimate, exact) > 0.9
    few = spsa_estimate([theta], loss, queries=4, eps=1e-4)
    assert cosine(few, exact) < cosine(estimate, exact)  # more queries, better direction


def test_spsa_matches_autograd_on_a_tiny_transformer():
    torch.manual_seed(0)
    classifier = build_classifier(resolve_model("tiny-bert"), 2, dropout=0.0, head="linear")
    model = get_method("adazeta").build(classifier, AdaZetaConfig(bottleneck=2, tt_rank=1,
                                                                      placement="ffn")).double().eval()
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    batch = {"input_ids": torch.randint(5, 100, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    labels = torch.randint(0, 2, (8,))

    def loss_value():
        return nn.functional.cross_entropy(model(**batch), labels)

    loss_value().backward()
    exact = torch.cat([p.grad.flatten() for p in params])
    d = exact.numel()
    with torch.no_grad():
        estimate = spsa_estimate(params, lambda: float(loss_value()), queries=8 * d, eps=1e-4)
    # with Gaussian directions the cosine is about (1 + d / Q)^-1/2
    assert cosine(estimate, exact) > 0.9, (d, cosine(estimate, exact))


def test_perturb_then_restore_is_bitwise_exact_on_float32():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(300, 70) * 0.02), nn.Parameter(torch.randn(70)), nn.Parameter(torch.zeros(5))]
    original = [p.detach().clone() for p in params]
    perturber = Perturber(params)
    perturber.begin_step()
    for q in range(3):
        perturber.set(query_seed(1, 2, q), +1, 1e-3)
        assert not torch.equal(params[0], original[0])
        perturber.set(query_seed(1, 2, q), -1, 1e-3)
        perturber.restore()
        for p, o in zip(params, original):
            assert torch.equal(p, o)


def test_update_replays_the_queries_and_decays_matrices_only():
    torch.manual_seed(0)
    w, bias = nn.Parameter(torch.randn(6, 4, dtype=torch.float64)), nn.Parameter(torch.randn(4, dtype=torch.float64))
    w0, b0 = w.detach().clone(), bias.detach().clone()
    perturber = Perturber([w, bias])
    perturber.begin_step()
    pairs = [(query_seed(0, 5, 0), 0.7), (query_seed(0, 5, 1), -1.3)]
    perturber.update(pairs, lr=0.1, weight_decay=0.01)
    dirs = [perturber.direction(seed) for seed, _ in pairs]
    mean = sum(g * z for (_, g), z in zip(pairs, dirs)) / 2
    mean_w, mean_b = mean[:24].view(6, 4), mean[24:]
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (mean_w + 0.01 * w0))
    torch.testing.assert_close(bias.detach(), b0 - 0.1 * mean_b)


def test_directions_regenerate_from_the_seed_and_sparsity_masks_large_weights():
    torch.manual_seed(0)
    w, bias = nn.Parameter(torch.randn(50, 40)), nn.Parameter(torch.randn(40))
    perturber = Perturber([w, bias], sparsity=0.75, chunk=300)  # chunks that straddle the two parameters
    perturber.begin_step()
    z1, z2 = perturber.direction(123), perturber.direction(123)
    assert torch.equal(z1, z2) and z1.shape == (50 * 40 + 40,)
    assert not torch.equal(z1, perturber.direction(124))
    perturbed = z1[:2000].view(50, 40) != 0
    assert perturbed.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert w.detach().abs()[perturbed].max() <= w.detach().abs()[~perturbed].min()
    assert torch.count_nonzero(z1[2000:]) == 40  # 1-D parameters are never masked
    w0 = w.detach().clone()
    perturber.set(123, +1, 1e-3)
    assert torch.equal(w.detach()[~perturbed], w0[~perturbed])  # the parameters are views of the buffer


TRAINED_BY = {"adazeta": (AdaZetaConfig(bottleneck=8, tt_rank=2), "adazeta"),
              "mezo-lora": (MezoConfig(target="lora", lora_rank=2), "mezo"),
              "sparse-mezo": (MezoConfig(target="full", sparsity=0.5), "mezo")}


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("method", list(TRAINED_BY))
def test_batched_queries_give_the_sequential_projected_gradients(model_name, method):
    """Three queries in one vmapped forward (six parameter sets) against one query at a time: the parameters each
    copy sees are the sequential ones to the bit, and each loss agrees to within 2 float32 ulps of the loss, so g_q
    to within 4 ulps / eps (measured: at most 1.5)."""
    config, name = TRAINED_BY[method]
    torch.manual_seed(0)
    model = get_method(name).build(build_classifier(resolve_model(model_name), 2, head="linear"), config).eval()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():   # adapters and LoRA start as the identity: give every trained matrix a say
        for _, p in trained:
            if p.ndim >= 2:
                p.normal_(std=0.1)
    perturber = Perturber([p for _, p in trained], config.sparsity)
    perturber.begin_step()
    batch = {"input_ids": torch.randint(5, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    batch["attention_mask"][0, 5:] = 0

    def loss_of(outputs, b):
        return F.cross_entropy(outputs.float(), b["labels"])

    seeds, eps = [11, 12, 13], 1e-3
    rows = perturber.perturbed_rows(seeds, eps)
    sequential = []
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            pair = []
            for sign in (+1, -1):
                perturber.set(seed, sign, eps)
                assert torch.equal(perturber.flat, rows[2 * i + (sign < 0)])
                pair.append(loss_of(model(**batch), batch).item())
            sequential.append(pair)
        perturber.restore()
    batched = BatchedLosses(model, trained, loss_of)(rows, batch).tolist()
    assert torch.equal(perturber.flat, perturber.start)   # the model's own parameters are left as they were
    for i, (plus, minus) in enumerate(sequential):
        ulp = float(torch.finfo(torch.float32).eps) * 2.0 ** math.floor(math.log2(max(abs(plus), abs(minus))))
        assert abs(batched[2 * i] - plus) <= 2 * ulp and abs(batched[2 * i + 1] - minus) <= 2 * ulp
        g_batched, g_sequential = (batched[2 * i] - batched[2 * i + 1]) / (2 * eps), (plus - minus) / (2 * eps)
        assert abs(g_batched - g_sequential) <= 4 * ulp / eps
        assert abs(g_sequential) > 100 * ulp / eps   # a projected gradient well above that tolerance


def test_query_groups_deal_consecutive_queries_round_robin():
    assert query_groups(5, 2, 0, 2) == [[0, 1], [4]] and query_groups(5, 2, 1, 2) == [[2, 3]]
    assert query_groups(5, 1, 1, 2) == [[1], [3]]               # one at a time: queries r, r + N, ...
    assert query_groups(3, 4, 1, 2) == []                       # one group: the second worker idles
    assert [busiest_worker_queries(q, 2, 2) for q in (1, 2, 3, 4, 5)] == [1, 2, 2, 2, 3]
    assert sorted(q for r in range(3) for g in query_groups(11, 3, r, 3) for q in g) == list(range(11))


def test_auto_query_batch_fills_free_gpu_memory_up_to_a_workers_share():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert auto_query_batch(cpu, 10**12, 10**6, 10**3, 16, 1) == 1      # batching measured slower on a CPU
    # 2 copies per query of 1 MB of forward and 1 kB of parameters in 80% of 10 MB: 3 fit; then the share of 16 / 2
    assert auto_query_batch(gpu, 10 * 10**6, 10**6, 10**3, 16, 2) == 3
    assert auto_query_batch(gpu, 10**12, 10**6, 10**3, 16, 2) == 8
    assert auto_query_batch(gpu, 10**3, 10**6, 10**3, 16, 2) == 1       # not even one: still one at a time


def test_query_seeds_are_unique_per_run_step_and_query():
    seeds = {query_seed(r, s, q) for r in (0, 1, 42) for s in (0, 1, 2, 999_999) for q in range(64)}
    assert len(seeds) == 3 * 4 * 64
    assert query_seed(0, 1, 0) != query_seed(0, 0, 1)
    with pytest.raises(ValueError):
        query_seed(0, 0, MAX_QUERIES)


def schedule_of(config, total_epochs: int, total_steps: int) -> QuerySchedule:
    """The SPSA engine's schedule for a method's config (it takes plain numbers)."""
    return QuerySchedule(config.alpha, config.beta, config.q_target, config.q_max, config.schedule_over,
                         total_epochs, total_steps)


def test_query_schedule_follows_the_formula():
    # Q_k = min(max(floor(alpha k^beta), 1), q_max)
    assert [queries_at(k, 0.85, 1.0, 20) for k in (1, 2, 3, 10, 30)] == [1, 1, 2, 8, 20]
    assert [queries_at(k, 2.0, 0.5, 100) for k in (1, 4, 9, 16)] == [2, 4, 6, 8]
    beta = derived_beta(0.85, 8, 40)
    assert beta == pytest.approx(math.log(8 / 0.85) / math.log(40))
    schedule = schedule_of(AdaZetaConfig(q_target=8, q_max=16), total_epochs=40, total_steps=80)
    assert schedule.queries(epoch=0, step=0) == 1 and schedule.queries(epoch=39, step=79) == 8
    by_steps = schedule_of(AdaZetaConfig(beta=1.0, q_max=5, schedule_over="steps"), total_epochs=1,
                             total_steps=100)
    assert [by_steps.queries(0, s) for s in (0, 1, 2, 9)] == [1, 1, 2, 5]
    assert schedule_of(MezoConfig(), 3, 30).queries(2, 29) == 1


def test_a_one_epoch_run_schedules_q_target_over_steps_and_says_so():
    """Over epochs, a run of one epoch would stay at Q = 1 whatever q_target: it counts steps instead."""
    schedule = schedule_of(AdaZetaConfig(q_target=8, q_max=16), total_epochs=1, total_steps=50)
    assert schedule.over == "steps" and "q_target 8" in schedule.note
    assert schedule.queries(epoch=0, step=0) == 1 and schedule.queries(epoch=0, step=49) == 8
    assert schedule_of(AdaZetaConfig(q_target=8, q_max=16), total_epochs=3, total_steps=50).note is None
    with pytest.raises(ValueError, match="method.q_target: 8 queries cannot be reached in a run of 1 step"):
        schedule_of(AdaZetaConfig(q_target=8, q_max=16), total_epochs=1, total_steps=1)


def test_an_unreachable_q_target_stops_the_cli_before_ray(tmp_path, glue_dir):
    from rayeff.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"model": {"name": "tiny-bert"}, "data": {"task": "sst2", "train_subset": 16},
                                   "method": {"name": "adazeta", "q_target": 8},
                                   "training": {"batch_size": 16, "max_steps": 1}}))
    assert main(["run", str(job), "--data-dir", str(glue_dir), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# -- method configs ----------------------------------------------------------------------------------------------


def zo_job(**method):
    return {"data": {"task": "sst2"}, "method": {"name": "adazeta", **method}}


def test_zeroth_order_job_errors_are_one_line():
    with pytest.raises(UserError, match="deepspeed: method adazeta trains without gradients"):
        validate_job({**zo_job(), "deepspeed": {"zero_stage": 2}})
    with pytest.raises(UserError, match="set beta or q_target, not both"):
        validate_job(zo_job(beta=0.5, q_target=4))
    with pytest.raises(UserError, match="method.q_max"):
        validate_job(zo_job(q_max=MAX_QUERIES + 1))
    with pytest.raises(UserError, match="method.target"):
        validate_job({"data": {"task": "sst2"}, "method": {"name": "mezo", "target": "prefix"}})
    # the batch is not split over workers: any size works with any worker count
    assert validate_job({**zo_job(), "training": {"batch_size": 5}, "scaling": {"num_workers": 2}})


def test_mezo_targets():
    torch.manual_seed(0)
    full = get_method("mezo").build(build_classifier(resolve_model("tiny-bert"), 2), MezoConfig(target="full"))
    assert trainable_parameter_count(full) == sum(p.numel() for p in full.parameters())
    lora = get_method("mezo").build(build_classifier(resolve_model("tiny-bert"), 2, head="linear"),
                                    MezoConfig(target="lora", lora_rank=2))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("head.") for n in names)


def test_adazeta_reports_its_size_and_cost_against_dense_adapters():
    classifier = build_classifier(resolve_model("tiny-bert"), 2, head="linear")
    d = classifier.backbone.config.hidden_size
    model = get_method("adazeta").build(classifier, AdaZetaConfig(bottleneck=8, tt_rank=3))
    f = model.figures()
    assert f["adapters"] == 4
    assert f["tt_params"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("adapters."))
    assert f["dense_adapter_params"] == 4 * (2 * d * 8 + 8 + d)
    assert f["flops_per_token"] == 4 * 2 * 3 * 2 * (d + 8)      # (x A) B: r (d_in + d_out) per row, down and up
    assert f["dense_flops_per_token"] == 4 * 2 * 2 * d * 8
