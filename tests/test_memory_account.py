"""The tensor account against what a real DeepSpeed engine holds: for full, LoRA and MoE at ZeRO 0-3 in float32 and
bf16, parameters + buffers + gradients + optimizer state equal the bytes of every distinct storage reachable from the
engine and its optimizer (tests/engine_account.py walks them), after a backward and before the optimizer step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [(m, s, p) for m in ("full", "lora", "moe") for s in (0, 1, 2, 3) for p in ("fp32", "bf16")
         if not (m == "moe" and s == 3)]


@pytest.fixture(scope="module")
def engines() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("engine_account.py")
    out = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["method"], r["stage"], r["precision"]): r for r in rows}


@pytest.mark.parametrize("method, stage, precision", CASES)
def test_the_account_holds_every_tensor_the_engine_holds(engines, method, stage, precision):
    row = engines[(method, stage, precision)]
    assert row["account"] == pytest.approx(row["reachable"], rel=0.01)


def test_deepspeed_s_float32_master_weights_are_counted(engines):
    """ZeRO 1-2 keep a float32 master partition even when training in float32; bf16 keeps float32 weights beside
    the bf16 ones: optimizer state is then Adam's two moments plus a float32 copy of the weights."""
    for stage, precision in ((1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16"), (3, "bf16")):
        row = engines[("full", stage, precision)]
        weights_fp32 = engines[("full", 0, "fp32")]["param_bytes"]
        assert row["optimizer_state_bytes"] == pytest.approx(3 * weights_fp32, rel=0.001)


def test_zero3_gathered_weights_are_not_counted_as_activations(engines):
    """Full fine-tuning saves the same activations at every stage. Under ZeRO-3, DeepSpeed's linear saves the input
    of every linear layer, frozen ones too: LoRA saves more there, exactly what the plan counts (not the weights
    gathered, which would be far more). Each engine starts from torch's linear, whatever engines came before."""
    assert engines[("full", 3, "fp32")]["activations"] == engines[("full", 0, "fp32")]["activations"]
    assert engines[("lora", 2, "fp32")]["activations"] == engines[("lora", 0, "fp32")]["activations"]
    extra = engines[("lora", 3, "fp32")]["activations"] - engines[("lora", 0, "fp32")]["activations"]
    planned = [plan_of("lora", stage, "fp32").activations for stage in (0, 3)]
    assert extra == planned[1] - planned[0] > 0
    assert extra < engines[("lora", 3, "fp32")]["param_bytes"] / 10


def plan_of(method: str, stage: int, precision: str):
    """`rayeff plan`'s per-worker memory (rayeff/plan) for the engines' job (tests/engine_account.py), from
    tiny-bert's config alone."""
    from rayeff.config import validate_job
    from rayeff.plan.planner import plan_job
    from rayeff.plan.shapes import plan_model_config

    spec = {"moe": {"name": "moe", "upcycle": {"experts": 2, "top_k": 1}}}.get(method, {"name": method})
    job = validate_job({"model": {"name": "tiny-bert"}, "data": {"task": "sst2"}, "method": spec,
                        "deepspeed": {"zero_stage": stage, "precision": precision},
                        "training": {"batch_size": 4, "max_seq_length": 8}})
    plan = plan_job(job, plan_model_config("tiny-bert"), [method], None)
    return plan.methods[method].memory_per_worker_bytes if method in plan.methods else plan.refused[method]


@pytest.mark.parametrize("method, stage, precision", [c for c in CASES if c[0] != "moe"])
def test_the_plan_predicts_each_engines_account(engines, method, stage, precision):
    """Parameters, gradients and optimizer state within 2% of the engine's account at every ZeRO stage and precision;
    saved activations within 2% too (the engines' loss is a logsumexp, the plan's the task's cross-entropy)."""
    row, planned = engines[(method, stage, precision)], plan_of(method, stage, precision)
    for plan_key, row_key in (("parameters", "param_bytes"), ("buffers", "buffer_bytes"), ("gradients", "grad_bytes"),
                              ("optimizer_state", "optimizer_state_bytes"), ("activations", "activations")):
        assert getattr(planned, plan_key) == pytest.approx(row[row_key], rel=0.02), plan_key


def test_an_upcycled_mixture_of_experts_is_refused_by_the_plan_with_its_reason():
    """Routing decides each expert's tokens from the data, which shapes alone do not give."""
    assert plan_of("moe", 1, "fp32").startswith("its forward cannot run on shapes alone")


def test_deepspeed_engines_start_without_the_inference_comm_op(engines):
    """initialize_deepspeed keeps DeepSpeed's communication backend from JIT-compiling its shared-memory all-reduce
    (a minute of g++ on a CPU machine, for tensor-parallel inference only): the real backend holds no such op."""
    assert {row["inference_comm_op"] for row in engines.values()} == {False}
