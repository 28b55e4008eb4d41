"""Training through DeepSpeed: on one local Ray in this process, ZeRO stages over 2 workers follow the 1-worker loss
curve, a killed worker restarts from its checkpoint, and `rayeff bench compare` writes its ratios; in process
(no Ray), a run's result.json and its energy budget."""

from __future__ import annotations

import json

import pytest

from rayeff.bench.compare import compare_methods, to_target
from rayeff.config import validate_job
from rayeff.measure.energy import SCOPES
from rayeff.methods import get_method
from rayeff.methods.read import ReadConfig
from rayeff.models import build_classifier, resolve_model
from rayeff.results import RunResult
from rayeff.train.runner import run_in_process, run_job

pytestmark = pytest.mark.slow


def tiny_job(tmp_path, glue_dir, name, **sections):
    raw = {
        "model": {"name": "tiny-bert", "dropout": 0.0},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "eval_subset": 32},
        "method": {"name": "full"},
        "training": {"max_steps": 5, "batch_size": 8, "lr": 1e-3, "log_every": 1, "max_grad_norm": 1.0},
        "scaling": {"num_workers": 1},
        "output_dir": str(tmp_path / name),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_job(raw)


def test_zero_stages_on_two_workers_follow_the_one_worker_loss_curve(tmp_path, glue_dir, local_ray):
    reference = run_in_process(tiny_job(tmp_path, glue_dir, "one"))["step_losses"]   # the same loop, one worker
    assert len(reference) == 5
    for stage in (1, 2, 3):
        result = run_job(tiny_job(tmp_path, glue_dir, f"zero{stage}", scaling={"num_workers": 2},
                                  deepspeed={"zero_stage": stage}), show_progress=False)
        assert result["workers"] == 2 and result["zero_stage"] == stage
        for step, (a, b) in enumerate(zip(reference, result["step_losses"])):
            assert abs(a - b) / abs(a) < 1e-4, (stage, step, a, b)
        assert result["loss_history"][-1] != result["loss_history"][0]  # it did train


def test_result_json_is_complete(tmp_path, glue_dir):
    result = run_in_process(tiny_job(tmp_path, glue_dir, "read", method={"name": "read", "hidden_size": 8}))
    on_disk = json.loads((tmp_path / "read" / "result.json").read_text())
    assert on_disk["metrics"] == result["metrics"] and "accuracy" in on_disk["metrics"]
    for key in ("method", "model", "task", "metrics", "train_loss", "energy", "memory", "time", "workers",
                "zero_stage"):
        assert key in on_disk, key
    assert on_disk["energy"]["source"] in ("nvml", "rapl", "estimate") and on_disk["energy"]["joules"] > 0
    if on_disk["energy"]["source"] == "estimate":
        assert "CPU seconds" in on_disk["energy"]["formula"]
    assert on_disk["energy"]["scope"] == SCOPES[on_disk["energy"]["source"]] and "fallback" not in on_disk["energy"]
    assert 0 < on_disk["energy"]["train_joules"] < on_disk["energy"]["joules"]
    # The memory figures, against the same READ model built here: float32 weights, one gradient per trainable
    # element, AdamW's two moments and one float32 `step` per trainable tensor, the side network's saved
    # activations (the backbone saves none), and a device peak that held at least all of it.
    memory = on_disk["memory"]
    model = get_method("read").build(build_classifier(resolve_model("tiny-bert"), 2, 0.0), ReadConfig(hidden_size=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert memory["trainable_params"] == sum(p.numel() for p in trainable) < memory["total_params"]
    assert memory["total_params"] == sum(p.numel() for p in model.parameters())
    assert memory["param_bytes"] == memory["total_params"] * 4
    assert memory["grad_bytes"] == memory["trainable_params"] * 4
    assert memory["optimizer_state_bytes"] == 2 * memory["trainable_params"] * 4 + 4 * len(trainable)
    assert memory["peak_activation_bytes"] > 0
    assert memory["tensor_account_bytes"] == sum(memory[k] for k in ("param_bytes", "buffer_bytes", "grad_bytes",
                                                                     "optimizer_state_bytes", "peak_activation_bytes"))
    assert memory["peak_device_bytes"] >= memory["tensor_account_bytes"]
    timing = on_disk["time"]
    assert timing["steps"] == 5 and timing["samples"] == 5 * 8
    assert timing["samples_per_second"] == pytest.approx(timing["samples"] / timing["train_seconds"], rel=1e-9)
    assert (tmp_path / "read" / "final" / "trainable.safetensors").is_file()


def test_bench_compare_writes_each_result_and_ratios_to_full(tmp_path, glue_dir, one_worker_runs_in_process,
                                                             check_report):
    job = tiny_job(tmp_path, glue_dir, "unused")
    out = tmp_path / "compare.json"
    report = compare_methods(job, ["full", "lora", "read"], str(out), runs_dir=str(tmp_path / "runs"),
                             show_progress=False, per_method=["read:training.lr=3e-3"])
    on_disk = json.loads(out.read_text())
    assert set(on_disk["results"]) == {"full", "lora", "read"}
    assert on_disk["results"]["read"]["job"]["training"]["lr"] == pytest.approx(3e-3)
    ratios = report["ratios_to_full"]
    assert ratios["full"]["tensor_account_bytes"] == pytest.approx(1.0)
    full, read = report["results"]["full"], report["results"]["read"]
    assert ratios["read"]["tensor_account_bytes"] == pytest.approx(
        read["memory"]["tensor_account_bytes"] / full["memory"]["tensor_account_bytes"])
    assert ratios["read"]["trainable_params"] < 1.0 and ratios["lora"]["trainable_params"] < 1.0
    assert ratios["read"]["tensor_account_bytes"] < ratios["lora"]["tensor_account_bytes"] < 1.0
    assert {r["time"]["steps"] for r in report["results"].values()} == {5}

    # `rayeff report` on the comparison: each method's curves, memory account and cost, side by side
    from rayeff.cli import main

    page = tmp_path / "compare.html"
    assert main(["report", str(out), "--output", str(page)]) == 0
    check_report(page, {"curves", "memory", "cost"})
    assert all(f"<h3>{method}</h3>" in page.read_text() for method in ("full", "lora", "read"))   # the settings


def test_bench_compare_target_mode_finds_where_each_method_first_reached_fulls_final_metric(
        tmp_path, glue_dir, one_worker_runs_in_process, capsys):
    job = tiny_job(tmp_path, glue_dir, "unused", training={"max_steps": 6})
    report = compare_methods(job, ["read", "full"], str(tmp_path / "compare.json"), runs_dir=str(tmp_path / "runs"),
                             show_progress=False, per_method=["read:training.lr=3e-3"], target="full", eval_every=2)
    assert list(report["results"]) == ["full", "read"]   # full first: its final metric is the target
    target = report["target"]
    assert target["value"] == report["results"]["full"]["metrics"]["accuracy"] and target["eval_every"] == 2
    for method, result in report["results"].items():
        history = result["eval_history"]
        assert [e["step"] for e in history][:3] == [2, 4, 6]
        seconds = [e["train_seconds"] for e in history[:3]]
        assert seconds == sorted(seconds) and seconds[0] > 0
        assert all(0 < e["train_joules"] <= e["joules"] for e in history)
        first = next((e for e in history if e["metrics"]["accuracy"] >= target["value"]), None)
        row = target["reached"][method]
        assert row["reached"] == (first is not None)
        if first is not None:
            assert (row["step"], row["train_joules"], row["train_seconds"]) == (
                first["step"], first["train_joules"], first["train_seconds"])
    assert target["reached"]["full"]["reached"] and target["ratios_to_full"]["full"]["train_joules"] == 1.0
    if target["reached"]["read"]["reached"]:
        assert target["ratios_to_full"]["read"]["train_joules"] == pytest.approx(
            target["reached"]["read"]["train_joules"] / target["reached"]["full"]["train_joules"])
    assert "to dev accuracy" in capsys.readouterr().out
    # a target every evaluation meets is met at the first; one none meets is never met, and the best is reported
    results = {m: RunResult.model_validate(r) for m, r in report["results"].items()}
    low, high = to_target(results, "accuracy", 0.0, "given", 2), to_target(results, "accuracy", 1.5, "given", 2)
    for method, result in report["results"].items():
        assert low["reached"][method]["step"] == 2 and low["reached"][method]["evaluations"] == 1
        assert high["reached"][method] == {"reached": False, "evaluations": len(result["eval_history"]),
                                           "best": max(e["metrics"]["accuracy"] for e in result["eval_history"])}
    assert low["ratios_to_full"]["read"]["step"] == 1.0 and high["ratios_to_full"] == {}


def test_a_lower_is_better_target_is_reached_from_above():
    from rayeff.bench.compare import first_reaching
    from rayeff.results import Evaluation

    losses = [3.0, 2.2, 1.9, 2.0]
    evaluations = [{"step": 10 * (i + 1), "joules": 5.0 * (i + 1), "train_joules": 4.0 * (i + 1),
                    "train_seconds": 1.0 * (i + 1), "metrics": {"eval_loss": v}} for i, v in enumerate(losses)]
    result = RunResult.model_construct(eval_history=[Evaluation(**e) for e in evaluations])
    assert first_reaching(result, "eval_loss", 2.0) == {"reached": True, "step": 30, "value": 1.9, "evaluations": 3,
                                                        "train_joules": 12.0, "train_seconds": 3.0, "joules": 15.0}
    assert first_reaching(result, "eval_loss", 1.5) == {"reached": False, "best": 1.9, "evaluations": 4}


def test_energy_budget_stops_the_run_with_a_resumable_checkpoint(tmp_path, glue_dir):
    job = tiny_job(tmp_path, glue_dir, "budget", training={"max_steps": 200, "log_every": 2},
                   energy={"budget_j": 0.5})
    result = run_in_process(job)
    assert result["status"] == "stopped: energy budget"
    assert 2 <= result["time"]["steps"] < 200 and result["time"]["steps"] % 2 == 0
    assert result["energy"]["joules"] >= 0.5
    assert any((tmp_path / "budget" / "train").glob("step_*"))


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_ends_with_the_same_weights(tmp_path, glue_dir,
                                                                                         local_ray):
    import threading
    import time

    import psutil

    sections = dict(training={"max_steps": 160, "log_every": 20, "checkpoint_every": 40},
                    model={"dropout": 0.1}, failure={"max_failures": 1},   # dropout: the RNG must be restored too
                    scaling={"threads_per_worker": 1})   # a Ray worker's default on 1 CPU; in process it would be 2
    clean = run_in_process(tiny_job(tmp_path, glue_dir, "clean", **sections))   # the same loop, never killed
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(
        result=run_job(tiny_job(tmp_path, glue_dir, "killed", **sections), show_progress=False)))
    run.start()
    train_dir, killed = tmp_path / "killed" / "train", None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and run.is_alive():
        if any(train_dir.glob("step_*")):   # a checkpoint exists: kill the worker mid-run
            # Only this test's own: local_ray started Ray in this process, so its workers descend from it (raylet ->
            # worker). Train workers of any other Ray on the machine are left alone.
            for proc in psutil.Process().children(recursive=True):
                try:
                    if any("RayTrainWorker" in part for part in proc.cmdline()):
                        proc.kill()
                        killed = proc.pid
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.02)
    assert killed is not None and not (tmp_path / "killed" / "result.json").exists()
    run.join(timeout=300)
    result = outcome["result"]
    assert result["status"] == "finished" and result["time"]["steps"] == 160
    weights = [(tmp_path / name / "final" / "trainable.safetensors").read_bytes() for name in ("clean", "killed")]
    assert weights[0] == weights[1] and clean["metrics"] == result["metrics"]


def test_a_first_order_run_asked_to_stop_ends_after_that_step_and_resumes_to_the_same_weights(tmp_path, glue_dir,
                                                                                               monkeypatch):
    """The driver's stop request (rayeff/train/interrupts.py) reaches the first-order loop in its per-step
    all-reduce; here rank 0 hears it at its third step's reduce, as it would from the driver."""
    import torch
    from safetensors.torch import load_file

    from rayeff.train.reporter import Reporter

    straight = run_in_process(tiny_job(tmp_path, glue_dir, "straight", training={"max_steps": 8}))
    calls = []
    monkeypatch.setattr(Reporter, "stop_flag", lambda self: calls.append(1) or float(len(calls) >= 3))
    stopped = run_in_process(tiny_job(tmp_path, glue_dir, "stopped", training={"max_steps": 8}))
    assert stopped["status"] == "stopped: interrupted" and stopped["time"]["steps"] == 3
    monkeypatch.setattr(Reporter, "stop_flag", lambda self: 0.0)
    job = tiny_job(tmp_path, glue_dir, "stopped", training={"max_steps": 8})
    job.resume = True
    resumed = run_in_process(job)
    assert resumed["status"] == "finished" and resumed["step_losses"] == straight["step_losses"]
    a, b = load_file(resumed["weights"]), load_file(straight["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["full", "lora", "read"])
def test_a_pretrained_backbone_trains_with_its_dropout_on_but_reads_frozen_one_stays_in_eval(tmp_path, glue_dir,
                                                                                            method):
    """transformers' from_pretrained hands MiniLM's backbone over in eval mode (dropout off); a first-order run
    trains it in train mode, as its config's dropout asks, and evaluates it in eval mode. READ runs its frozen
    backbone as in inference: in eval mode throughout."""
    import torch
    from transformers import BertModel

    calls = []   # (autograd on, the backbone in train mode) at each forward of the backbone

    def record(module, args):
        if isinstance(module, BertModel):
            calls.append((torch.is_grad_enabled(), module.training))

    job = tiny_job(tmp_path, glue_dir, method, model={"name": "minilm-l6", "dropout": None}, method={"name": method},
                   training={"max_steps": 2, "max_seq_length": 32}, data={"eval_subset": 8})
    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = run_in_process(job)
    finally:
        hook.remove()
    assert result["status"] == "finished" and calls
    if method == "read":   # no autograd through the backbone, and never in train mode
        assert not any(training for _, training in calls)
    else:
        assert [training for grad, training in calls if grad] == [True, True]   # the two training steps
        assert not any(training for grad, training in calls if not grad)         # evaluation
