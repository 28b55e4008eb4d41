"""`rayeff plan` against what runs hold: the planned per-worker memory of each method equals the tensor account of a
real run of the same job (result.json), and the plan needs only a model's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayeff.cli import main
from rayeff.config import validate_job
from rayeff.plan.calibration import Calibration, Throughput
from rayeff.plan.planner import plan_job
from rayeff.plan.shapes import model_shapes, plan_model_config
from rayeff.train.runner import run_in_process

METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "dropout": 0.1}, "read": {"name": "read"},
           "adazeta": {"name": "adazeta", "q_max": 2, "q_target": None, "beta": 0.0}}


def one_step_job(tmp_path, glue_dir, method: str, precision: str = "fp32"):
    """One step on full-length sequences (padded to max_length), as the plan assumes."""
    return validate_job({
        "model": {"name": "tiny-bert"}, "method": METHODS[method],
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 16, "eval_subset": 8},
        "training": {"max_steps": 1, "batch_size": 8, "max_seq_length": 16, "padding": "max_length"},
        "deepspeed": {"precision": precision}, "scaling": {"num_workers": 1},
        "output_dir": str(tmp_path / f"{method}-{precision}")})


@pytest.mark.parametrize("method, precision", [("full", "fp32"), ("full", "bf16"), ("lora", "fp32"), ("read", "fp32"),
                                               ("adazeta", "bf16")])
def test_the_plan_of_each_method_is_the_tensor_account_of_its_run(tmp_path, glue_dir, method, precision):
    job = one_step_job(tmp_path, glue_dir, method, precision)
    planned = plan_job(job, plan_model_config("tiny-bert"), [method], None).methods[method]
    measured = run_in_process(job)["memory"]
    memory = planned.memory_per_worker_bytes
    assert planned.trainable_params == measured["trainable_params"]
    assert planned.total_params == measured["total_params"]
    for plan_key, run_key in (("parameters", "param_bytes"), ("buffers", "buffer_bytes"), ("gradients", "grad_bytes"),
                              ("optimizer_state", "optimizer_state_bytes")):
        assert getattr(memory, plan_key) == pytest.approx(measured[run_key], rel=0.02), plan_key
    assert memory.activations == pytest.approx(measured["peak_activation_bytes"], rel=0.15)
    assert memory.perturbation_snapshot == measured.get("perturbation_snapshot_bytes", 0)
    if method == "adazeta":   # no autograd: nothing saved, no gradient, no optimizer state
        assert memory.activations == memory.gradients == memory.optimizer_state == 0
    else:
        assert memory.activations > 0


def test_zero_stages_partition_what_deepspeed_partitions():
    """The planner's partitioning at 4 workers against 1 (a pin of its formulas; benchmarks/issue-19 checks them
    against runs on 1 and 2 workers: exact but for ZeRO 1-2's gradients on 2 workers, where the plan's partition
    plus a bucket is an upper bound). ZeRO 1-3 split the optimizer state, ZeRO-3 the weights too; ZeRO 1-3 plan a
    gradient partition and a reduction bucket (here the whole model's size: tiny-bert is under DeepSpeed's 5e8
    elements); offloaded optimizer state moves to host memory. Each worker sends a gradient all-reduce's bytes at
    ZeRO 0-2 and, at ZeRO-3, the weights gathered twice more."""
    config = plan_model_config("tiny-bert")

    def plan(stage: int, workers: int, offload: bool = False):
        job = validate_job({"model": {"name": "tiny-bert"}, "data": {"task": "sst2"}, "method": {"name": "full"},
                            "training": {"batch_size": 8 * workers, "max_seq_length": 16},
                            "deepspeed": {"zero_stage": stage, "offload_optimizer": offload},
                            "scaling": {"num_workers": workers}})
        return plan_job(job, config, ["full"], None).methods["full"]

    one = plan(0, 1)
    w, mem = one.trainable_params, one.memory_per_worker_bytes
    assert one.comm_bytes_per_step == 0 and mem.gradients == 4 * w
    for stage in (0, 1, 2, 3):
        four = plan(stage, 4)
        m = four.memory_per_worker_bytes
        assert m.activations == mem.activations   # the same 8 sequences per worker
        assert m.optimizer_state == (mem.optimizer_state if stage == 0 else pytest.approx(3 * w * 4 / 4, abs=16))
        assert m.gradients == (4 * w if stage == 0 else w + 4 * w)
        assert m.parameters == (mem.parameters // 4 if stage == 3 else mem.parameters)
        gathered = 2 * 0.75 * 4 * one.total_params if stage == 3 else 0
        assert four.comm_bytes_per_step == round((0.75 if stage == 3 else 1.5) * 4 * w + gathered)
    on_host, on_device = plan(2, 4, offload=True), plan(2, 4).memory_per_worker_bytes
    assert on_host.memory_per_worker_bytes.optimizer_state == 0 and four.host_bytes_per_worker == 0
    assert on_host.host_bytes_per_worker == on_device.optimizer_state
    assert on_host.memory_per_worker_bytes.total == on_device.total - on_device.optimizer_state


def test_rayeff_plan_from_a_config_json_alone_for_every_method(tmp_path, capsys):
    """A model given only as a config.json (no weights, no tokenizer): every method that trains the task is planned
    or refused with its reason, and the JSON has the fields the checks read."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "bert", "vocab_size": 30522, "hidden_size": 1024,
                                  "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                                  "max_position_embeddings": 512}))
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{name: {config}}}\ndata: {{task: sst2}}\nmethod: {{name: lora}}\n"
                   "training: {batch_size: 64, max_seq_length: 256}\ndeepspeed: {zero_stage: 2}\n")
    out = tmp_path / "plan.json"
    assert main(["plan", str(job), "--workers", "4", "--gpu-memory", "16", "--methods", "all",
                 "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["workers"] == 4 and plan["batch_per_worker"] == 16 and plan["gpu_memory_bytes"] == 16 * 10**9
    full = plan["methods"]["full"]
    assert full["total_params"] == 335_143_938   # BERT-large without its pooler, and the mlp head
    memory = full["memory_per_worker_bytes"]
    assert set(memory) >= {"parameters", "gradients", "optimizer_state", "activations", "total"}
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert memory["parameters"] == 4 * full["total_params"] and full["fits"] == (memory["total"] <= 16e9)
    assert plan["methods"]["read"]["memory_per_worker_bytes"]["total"] < memory["total"]
    assert plan["methods"]["adazeta"]["comm_bytes_per_step"] > 0 and "mezo" in plan["methods"]
    assert set(plan["methods"]) | set(plan["refused"]) == {"adazeta", "full", "lora", "mezo", "moe", "read"}
    assert "full" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers: 0"),
    (["--gpu-memory", "-1"], "--gpu-memory: -1.0"),
    (["--methods", "fulll"], "--methods: fulll is not a method"),
    (["--gpu-memory", "inf"], "--gpu-memory: inf"),
    (["--set", "method.name=moe", "--set", "method.upcycle={experts: 2, top_k: 1}"],
     "--methods: no method could be planned for this job"),
    (["--set", "method.name=lora", "--set", "method.target_modules=[nosuch]"],   # PEFT's ValueError: a reason
     "--methods: no method could be planned for this job"),
])
def test_bad_plan_options_are_one_line_errors(tmp_path, capsys, argv, message):
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: tiny-bert}\ndata: {task: sst2}\nmethod: {name: full}\n")
    assert main(["plan", str(job), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_plan_sets_each_prediction_beside_its_run(tmp_path, glue_dir, one_worker_runs_in_process):
    """`rayeff bench plan` through the CLI (one-worker runs in process): a case per method and stage, each term
    predicted and measured, their ratio, and the largest error per term; with a calibration (the one committed with
    the time benchmark), the plan's seconds per step beside the run's."""
    out = tmp_path / "plan-vs-run.json"
    assert main(["bench", "plan", "--job", "jobs/bench-plan.yaml", "--output", str(out), "--data-dir", str(glue_dir),
                 "--methods", "full,read,mezo", "--stages", "0,3", "--workers", "1", "--runs-dir",
                 str(tmp_path / "runs"), "--no-progress", "--calibration",
                 "benchmarks/issue-19/calibration-cpu.json"]) == 0
    report = json.loads(out.read_text())
    assert [(c["method"], c["zero_stage"]) for c in report["cases"]] == [("full", 0), ("full", 3), ("read", 0),
                                                                        ("read", 3), ("mezo", 0)]
    for case in report["cases"]:
        run = json.loads((tmp_path / "runs" / f"{case['method']}-zero{case['zero_stage']}-1w" / "result.json")
                         .read_text())
        assert case["measured"]["parameters"] == run["memory"]["param_bytes"]
        assert case["ratio"]["parameters"] == case["predicted"]["parameters"] / run["memory"]["param_bytes"]
        assert all(abs(r - 1) <= 0.02 for t, r in case["ratio"].items() if t != "activations"), case
        assert abs(case["ratio"]["activations"] - 1) <= 0.15, case
        timed = case["time_per_step"]
        assert timed["measured_s"] == run["time"]["seconds_per_step"]
        assert timed["predicted_s"] == pytest.approx(sum(timed["terms_s"].values()))
        assert timed["ratio"] == timed["predicted_s"] / timed["measured_s"]
    assert report["time_ratio_range"] == [min(c["time_per_step"]["ratio"] for c in report["cases"]),
                                          max(c["time_per_step"]["ratio"] for c in report["cases"])]
    assert report["unmatched"] == [] and report["largest_relative_error"]["gradients"] <= 0.02


def _tiny_job_file(tmp_path, glue_dir, extra: str = "") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{name: tiny-bert}}\ndata: {{task: sst2, data_dir: {glue_dir}}}\nmethod: {{name: full}}\n"
                   f"training: {{batch_size: 8, max_seq_length: 64}}\n{extra}")
    return job


def test_rayeff_run_warns_or_with_strict_refuses_a_job_its_plan_says_cannot_fit(tmp_path, glue_dir, capsys,
                                                                                  ray_calls):
    """`--memory-per-worker` a kilobyte under the plan's tensors per worker: with --strict, one line and exit 2
    before Ray starts, nothing written; without, a warning line and the run goes on to Ray. A kilobyte over it:
    no line at all."""
    from rayeff.config import load_job
    from rayeff.plan.planner import worker_bytes

    job = _tiny_job_file(tmp_path, glue_dir)
    planned = worker_bytes(load_job(job))
    out = tmp_path / "out"
    argv = ["run", str(job), "--output", str(out), "--no-progress", "--memory-per-worker"]
    under, over = str((planned - 1000) / 1e9), str((planned + 1000) / 1e9)

    assert main([*argv, under, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not ray_calls and not out.exists(), err
    assert f"the plan puts {planned / 1e9:.3f} GB of tensors on each worker (full, ZeRO-0, fp32, batch 8 x 64)" in err
    assert f"--memory-per-worker {float(under):g}" in err and "rayeff plan JOB --methods all" in err

    assert main([*argv, under]) == 1 and len(ray_calls) == 1   # warned, then on to Ray (which the test stops)
    err = capsys.readouterr().err
    assert "rayeff: warning: the plan puts" in err and "--strict refuses" in err

    assert main([*argv, over, "--strict"]) == 1 and len(ray_calls) == 2
    assert "the plan puts" not in capsys.readouterr().err


def test_a_gpu_job_is_checked_against_the_smallest_local_gpu_unless_it_runs_on_a_cluster(tmp_path, glue_dir,
                                                                                          monkeypatch):
    """Without --memory-per-worker: a GPU job on the local Ray is checked against this machine's smallest GPU
    (NVML's figure, here replaced); a CPU job, or a GPU job on a cluster, has nothing to be checked against."""
    import rayeff.plan.fit
    from rayeff.config import load_job
    from rayeff.errors import UserError
    from rayeff.plan.fit import check_run_fits

    monkeypatch.setattr(rayeff.plan.fit, "local_gpu_memory_bytes", lambda: 10**6)
    gpu_job = load_job(_tiny_job_file(tmp_path, glue_dir, "scaling: {gpus_per_worker: 1}\n"))
    with pytest.raises(UserError, match=r"over the 0\.001 GB of this machine's smallest GPU \(0\.0 GB\)"):
        check_run_fits(gpu_job, None, None, strict=True)
    assert check_run_fits(gpu_job, None, "ray://head:10001", strict=True) is None
    assert check_run_fits(load_job(_tiny_job_file(tmp_path, glue_dir)), None, None, strict=True) is None
    # a worker with half a GPU of 0.03 GB has 0.015 GB: the plan's 0.020 GB fit the whole GPU, not half of it
    monkeypatch.setattr(rayeff.plan.fit, "local_gpu_memory_bytes", lambda: 3 * 10**7)
    whole, half = (load_job(_tiny_job_file(tmp_path, glue_dir, f"scaling: {{gpus_per_worker: {share}}}\n"))
                   for share in (1, 0.5))
    assert check_run_fits(whole, None, None, strict=True) is None
    with pytest.raises(UserError, match=r"0\.020 GB of tensors .* over the 0\.015 GB of this machine's smallest GPU "
                                        r"\(0\.0 GB\) times the worker's 0\.5 of it"):
        check_run_fits(half, None, None, strict=True)


def test_a_job_the_planner_cannot_plan_runs_unchecked_and_strict_says_so(tmp_path, glue_dir):
    """LoRA whose target modules match nothing: PEFT refuses to build it, so there is no plan. The run is not
    stopped by the check (the worker will report PEFT's error as it would have); with --strict a line says why
    memory was not checked."""
    from rayeff.config import load_job
    from rayeff.plan.fit import check_run_fits

    job = load_job(_tiny_job_file(tmp_path, glue_dir), ["method={name: lora, target_modules: [nosuch]}"])
    assert check_run_fits(job, 0.001, None, strict=False) is None
    note = check_run_fits(job, 0.001, None, strict=True)
    assert note.startswith("rayeff: --strict: memory not checked, the job cannot be planned (") and "nosuch" in note


def test_zero_3_gathers_reads_frozen_backbone_for_the_forward_only():
    """READ's backbone runs without autograd: at ZeRO-3 the plan counts one all-gather of the weights per step
    (LoRA's backward needs them again: two), besides the reduce-scatter of the trained parameters' gradients."""
    from rayeff.plan.planner import ring

    job = validate_job({"model": {"name": "tiny-bert"}, "data": {"task": "sst2"}, "method": {"name": "lora"},
                        "training": {"batch_size": 8, "max_seq_length": 32}, "scaling": {"num_workers": 2},
                        "deepspeed": {"zero_stage": 3}})
    plan = plan_job(job, plan_model_config("tiny-bert"), ["lora", "read"], None).methods
    for name, gathers in (("lora", 2), ("read", 1)):
        m = plan[name]
        expected = gathers * ring("all-gather", m.total_params * 4, 2) + ring("reduce-scatter",
                                                                               m.trainable_params * 4, 2)
        assert m.comm_bytes_per_step == round(expected), name
    assert "forward only" in plan["read"].comm_kind and "forward and backward" in plan["lora"].comm_kind


@pytest.mark.parametrize("value", ["0", "-2", "inf"])
def test_a_bad_memory_per_worker_is_a_one_line_error(tmp_path, glue_dir, capsys, ray_calls, value):
    job = _tiny_job_file(tmp_path, glue_dir)
    assert main(["run", str(job), "--output", str(tmp_path / "out"), "--memory-per-worker", value]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--memory-per-worker: {float(value)}" in err and len(err.splitlines()) == 1 and not ray_calls


@pytest.mark.parametrize("method", ["full", "lora", "read", "adazeta"])
def test_the_plans_operations_per_step_are_those_of_the_runs_own_step(tmp_path, glue_dir, method):
    """The plan counts a step's floating-point operations on the meta device; the same count (torch's
    FlopCounterMode) over the model a worker builds, on a real batch of full-length sequences, is equal: the forward
    and loss, and the backward of a first-order method (only what its trained parameters need: LoRA's and READ's
    are smaller than full fine-tuning's)."""
    from rayeff.models import resolve_model
    from rayeff.plan.calibration import count_work
    from rayeff.train.run_setup import RunSetup

    job = one_step_job(tmp_path, glue_dir, method)
    planned = plan_job(job, plan_model_config("tiny-bert"), [method], None).methods[method]
    run = RunSetup.build(job, resolve_model("tiny-bert"), torch.device("cpu"))
    batch = run.batch(list(range(8)), torch.device("cpu"))
    batch["attention_mask"].fill_(1)   # padded to max_length, and every token taken as real: the plan's case
    first_order = run.method.loop == "first_order"
    with torch.set_grad_enabled(first_order), count_work() as forward:
        loss = run.loss(run.model(**batch), batch["labels"])
    if first_order:
        with count_work() as backward:
            loss.backward()
        assert planned.flops_per_step == forward.flops + backward.flops
        assert (backward.flops < 2 * forward.flops) == (method != "full")
    else:   # two forwards per query, q_max queries by default
        assert planned.flops_per_step == 2 * job.method.q_max * forward.flops
    assert forward.flops > 0


def test_the_calibration_interpolates_its_rates_and_the_plans_seconds_are_its_terms(tmp_path, glue_dir):
    """Each term of a step's time is its work over the calibration's rate for it; joules are seconds times the
    calibration's watts per worker, times the workers."""
    low = Throughput(hidden_size=16, forward_flops_per_s=1e9, backward_flops_per_s=2e9, inference_flops_per_s=4e9)
    high = Throughput(hidden_size=64, forward_flops_per_s=4e9, backward_flops_per_s=8e9, inference_flops_per_s=16e9)
    calibration = Calibration(device="cpu", threads=1, op_seconds=2e-6, throughput=[low, high],
                              update_seconds_per_element=3e-9, update_seconds_per_tensor=1e-5,
                              perturb_seconds_per_element=5e-9, copy_seconds_per_element=1e-9,
                              allreduce_bytes_per_s=1e8, watts=10.0, energy_source="estimate",
                              energy_formula="E = ...", torch_version="x", host="h", measured_at="t")
    rates = calibration.at(32)   # tiny-bert's hidden size; halfway in log size: the geometric means
    assert (rates.forward_flops_per_s, rates.inference_flops_per_s) == pytest.approx((2e9, 8e9))
    assert calibration.at(8) == low and calibration.at(128) == high
    for method in ("full", "adazeta"):
        raw = one_step_job(tmp_path, glue_dir, method).model_dump(mode="json")
        raw["scaling"]["num_workers"] = 2
        job = validate_job(raw)
        plan = plan_job(job, plan_model_config("tiny-bert"), [method], None, calibration).methods[method]
        batch = job.micro_batch_size() if method == "full" else job.training.batch_size   # a query: the whole batch
        shapes = model_shapes(job, plan_model_config("tiny-bert"), batch)
        t, w = plan.time, shapes.trainable_params
        if method == "full":
            assert t.seconds["forward"] == pytest.approx(shapes.forward_flops / 2e9 + shapes.forward_ops * 2e-6)
            assert t.seconds["backward"] == pytest.approx(shapes.backward_flops / rates.backward_flops_per_s
                                                          + shapes.backward_ops * 2e-6)
            assert t.seconds["update"] == pytest.approx(w * 3e-9 + shapes.trainable_tensors * 1e-5)   # ZeRO-0
        else:   # q_max 2 queries over 2 workers: one each, two forwards each
            assert t.queries_per_step == 2
            assert t.seconds["forward"] == pytest.approx(2 * (shapes.forward_flops / 8e9 + shapes.forward_ops * 2e-6))
            assert t.seconds["perturbations"] == pytest.approx(w * ((2 + 2) * 5e-9 + 2 * 1e-9))
        assert plan.comm_bytes_per_step > 0 and t.seconds["communication"] == pytest.approx(
            plan.comm_bytes_per_step / 1e8)
        assert t.seconds_per_step == pytest.approx(sum(t.seconds.values()))
        assert t.joules_per_step == pytest.approx(t.seconds_per_step * 10.0 * 2) and t.steps == 1
        assert t.joules_total == pytest.approx(t.joules_per_step) and t.energy_source == "estimate"


def test_rayeff_calibrate_then_plan_with_its_file(tmp_path, capsys):
    """`rayeff calibrate` measures this machine (a short run: two hidden sizes, 0.05 s timings) and `rayeff plan
    --calibration` prints and writes each method's seconds and joules per step from it; the estimate says so."""
    calibration = tmp_path / "cal.json"
    assert main(["calibrate", "--output", str(calibration), "--hidden-sizes", "32,64", "--seconds", "0.05"]) == 0
    measured = json.loads(calibration.read_text())
    assert [t["hidden_size"] for t in measured["throughput"]] == [32, 64] and measured["threads"] == 1
    assert measured["op_seconds"] > 0 and measured["allreduce_bytes_per_s"] > 0 and measured["watts"] > 0
    assert measured["energy_source"] in ("rapl", "estimate")
    out = tmp_path / "plan.json"
    assert main(["plan", "jobs/bench-plan.yaml", "--methods", "full,mezo", "--workers", "2", "--calibration",
                 str(calibration), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    for name in ("full", "mezo"):
        t = plan["methods"][name]["time"]
        assert t["seconds_per_step"] == pytest.approx(sum(v for v in t["seconds"].values()))
        assert t["joules_per_step"] == pytest.approx(t["seconds_per_step"] * measured["watts"] * 2)
        assert f"{t['seconds_per_step'] * 1e3:,.1f} ms" in printed
    assert ("energy is an estimate" in printed) == (measured["energy_source"] == "estimate")
    assert main(["calibrate", "--output", str(calibration)]) == 2   # never replaced without --overwrite
    assert "already exists" in capsys.readouterr().err
    calibration.write_text('{"device": "cpu"}')
    assert main(["plan", "jobs/bench-plan.yaml", "--calibration", str(calibration)]) == 2
    assert capsys.readouterr().err.strip() == (f"rayeff: error: --calibration: {calibration} is not a calibration "
                                               "(13 fields wrong, e.g. threads); write one with `rayeff calibrate "
                                               "--output FILE`")
