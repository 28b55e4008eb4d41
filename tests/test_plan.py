"""`rayeff plan` against what runs hold: the planned per-worker memory of each method equals the tensor account of a
real run of the same job (result.json), and the plan needs only a model's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rayeff.cli import main
from rayeff.config import validate_job
from rayeff.plan.planner import plan_job
from rayeff.plan.shapes import plan_model_config
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
    predicted and measured, their ratio, and the largest error per term."""
    out = tmp_path / "plan-vs-run.json"
    assert main(["bench", "plan", "--job", "jobs/bench-plan.yaml", "--output", str(out), "--data-dir", str(glue_dir),
                 "--methods", "full,read,mezo", "--stages", "0,3", "--workers", "1", "--runs-dir",
                 str(tmp_path / "runs"), "--no-progress"]) == 0
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
