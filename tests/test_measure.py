"""Memory and energy measurement against hand-computed values."""

from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pynvml
import pytest
import torch
from rich.console import Console
from torch import nn

from rayeff.measure import energy as energy_module
from rayeff.measure.energy import CpuTimeEstimateMeter, NvmlMeter, combine, make_meter
from rayeff.measure.memory import SavedActivationCounter, optimizer_state_bytes, tensor_account


def test_saved_activation_counter_counts_what_autograd_keeps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(8, 10)
    counter = SavedActivationCounter(model)
    with counter:
        model(x).sum().backward()
    # Linear 1 saves its input x (8x10); ReLU saves its output (8x20); Linear 2 saves its input, the same storage
    # as ReLU's output. Weights are parameters and not counted.
    assert counter.peak_bytes == (8 * 10 + 8 * 20) * 4


def test_saved_activation_counter_keeps_the_peak_over_steps():
    model = nn.Linear(4, 4)
    counter = SavedActivationCounter(model)
    for rows in (16, 2):
        with counter:
            model(torch.randn(rows, 4)).sum().backward()
    assert counter.last_bytes == 2 * 4 * 4
    assert counter.peak_bytes == 16 * 4 * 4


def test_no_grad_forward_saves_nothing():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU())
    counter = SavedActivationCounter(model)
    with counter, torch.no_grad():
        model(torch.randn(8, 10))
    assert counter.peak_bytes == 0


def test_tensor_account_of_adamw_after_a_step():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counter = SavedActivationCounter(model)
    with counter:
        model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    trainable = 20 * 5 + 5
    account = tensor_account(model, optimizer, counter)
    assert account.trainable_params == trainable
    assert account.total_params == trainable + 10 * 20 + 20
    assert account.param_bytes == account.total_params * 4
    assert account.grad_bytes == trainable * 4
    # exp_avg and exp_avg_sq per trainable tensor, plus one float32 `step` scalar per tensor (two tensors)
    assert optimizer_state_bytes(optimizer) == 2 * trainable * 4 + 2 * 4
    assert account.optimizer_state_bytes == optimizer_state_bytes(optimizer)
    assert account.peak_activation_bytes == 3 * 20 * 4  # only the trainable layer's input is saved
    assert account.buffer_bytes == 0


def test_estimate_meter_grows_with_cpu_work_and_says_how():
    import psutil

    def cpu_seconds() -> float:   # the kernel's own account of this process, read by another library
        times = psutil.Process().cpu_times()
        return times.user + times.system

    meter = CpuTimeEstimateMeter(watts_per_cpu=10.0)
    outer_start = cpu_seconds()
    meter.start()
    inner_start = cpu_seconds()
    x = torch.randn(400, 400)
    for _ in range(200):
        x = torch.tanh(x @ x)
    inner_end = cpu_seconds()
    joules = meter.read_joules()
    outer_end = cpu_seconds()
    # E = this process's CPU seconds x 10 W, bracketed by CPU clocks read just inside and just outside the meter's
    # (psutil's counts 10 ms ticks: one tick of slack either way)
    assert 0 < 10.0 * (inner_end - inner_start - 0.01) <= joules <= 10.0 * (outer_end - outer_start + 0.01)
    assert meter.source == "estimate" and "10 W" in meter.formula


def test_the_estimate_meter_counts_a_few_milliseconds_of_cpu_work():
    """A short training step (READ on a tiny model: a few ms) has energy: a meter that counted whole 10 ms clock
    ticks read it as 0 J, or as a whole tick (0.1 J at 10 W)."""
    meter = CpuTimeEstimateMeter(watts_per_cpu=10.0)
    readings = []
    for _ in range(5):
        meter.start()
        start = time.thread_time()
        while time.thread_time() - start < 0.002:   # 2 ms of CPU work in this thread
            pass
        readings.append(meter.read_joules())
    # 2 ms at 10 W at least; and, in the middle reading, less than a tick more (the meter counts every thread of the
    # process, and a busy machine gave one burst a background thread's few ms: 0.093 J)
    assert min(readings) >= 0.02 and sorted(readings)[2] < 0.09, readings


def test_auto_meter_on_this_cpu_never_claims_a_measurement_it_cannot_make():
    meter = make_meter("auto", torch.device("cpu"), 10.0)
    assert meter.source in ("rapl", "estimate")
    with pytest.raises(RuntimeError, match="no GPU"):
        make_meter("nvml", torch.device("cpu"), 10.0)


def test_combine_counts_each_physical_counter_once():
    readings = [
        {"key": "rapl:host-a", "joules": 100.0, "source": "rapl", "formula": None},
        {"key": "rapl:host-a", "joules": 101.0, "source": "rapl", "formula": None},   # same package, 2nd worker
        {"key": "rapl:host-b", "joules": 50.0, "source": "rapl", "formula": None},
    ]
    assert combine(readings) == {"joules": 151.0, "source": "rapl",
                                 "scope": "package: whole CPU package, other processes included"}
    est = combine([{"key": "estimate:h:1", "joules": 2.0, "source": "estimate", "formula": "E = t x P"},
                   {"key": "estimate:h:2", "joules": 3.0, "source": "estimate", "formula": "E = t x P"}])
    assert est == {"joules": 5.0, "source": "estimate", "formula": "E = t x P",
                   "scope": "worker processes: CPU time of the run's own worker processes"}
    gpu = combine([{"key": "nvml:GPU-a", "joules": 7.0, "source": "nvml", "formula": None}])
    assert gpu["scope"].startswith("gpu device")


# -- energy meters: which counter, what happens when one fails, what each covers -----------------------------------

def burn_cpu() -> None:
    x = torch.randn(200, 200)
    for _ in range(100):
        x = torch.tanh(x @ x)


class FakeNvml:
    """NVML's functions over four fake GPUs, each with its own energy counter (mJ); `lost` makes reads fail."""

    UUIDS = [f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(4)]

    def __init__(self, monkeypatch, cuda_visible: list[int]):
        self.mj = {i: 1_000_000 * (i + 1) for i in range(4)}
        self.lost = False
        handle = {u: i for i, u in enumerate(self.UUIDS)}

        def by_uuid(uuid):
            if uuid not in handle:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
            return handle[uuid]

        def energy(h):
            if self.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return self.mj[h]

        for name, fn in {"nvmlInit": lambda: None, "nvmlDeviceGetHandleByIndex": lambda i: i,
                         "nvmlDeviceGetHandleByUUID": by_uuid, "nvmlDeviceGetUUID": lambda h: self.UUIDS[h],
                         "nvmlDeviceGetTotalEnergyConsumption": energy}.items():
            monkeypatch.setattr(pynvml, name, fn)

        class CUuuid:   # torch's uuid: str() is the UUID without NVML's "GPU-" prefix
            def __init__(self, text):
                self.text = text

            def __str__(self):
                return self.text

        # CUDA_VISIBLE_DEVICES=3,1 as Ray sets it: CUDA's device 0 is NVML's device 3
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: types.SimpleNamespace(uuid=CUuuid(self.UUIDS[cuda_visible[i]][4:])))


@pytest.fixture
def no_rapl(monkeypatch, tmp_path):
    monkeypatch.setattr(energy_module, "POWERCAP", tmp_path / "no-powercap")


def test_nvml_meter_reads_the_gpu_cuda_calls_its_device_not_nvmls_device_of_that_index(monkeypatch):
    nvml = FakeNvml(monkeypatch, cuda_visible=[3, 1])
    first, second = NvmlMeter(0), NvmlMeter(1)
    assert first.key == f"nvml:{FakeNvml.UUIDS[3]}" and second.key == f"nvml:{FakeNvml.UUIDS[1]}"
    first.start()
    second.start()
    nvml.mj[3] += 2500      # only NVML's GPU 3 (CUDA's 0) and GPU 1 (CUDA's 1) draw energy
    nvml.mj[1] += 700
    nvml.mj[0] += 999_000
    assert first.read_joules() == 2.5 and second.read_joules() == 0.7


def test_nvml_failing_mid_run_continues_with_the_estimate_and_keeps_its_joules(monkeypatch, no_rapl):
    nvml = FakeNvml(monkeypatch, cuda_visible=[3])
    meter = make_meter("auto", torch.device("cuda", 0), 10.0)
    meter.start()
    nvml.mj[3] += 2000
    assert meter.read_joules() == 2.0 and meter.source == "nvml"
    nvml.mj[3] += 3000
    assert meter.read_joules() == 5.0
    nvml.lost = True                     # the third read fails: the run goes on, from the joules counted so far
    readings = [meter.read_joules()]
    burn_cpu()
    readings.append(meter.read_joules())
    assert 5.0 <= readings[0] < readings[1]
    assert meter.source == "nvml+estimate"
    energy = combine(meter.readings())
    assert energy["joules"] >= readings[1] and energy["source"] == "nvml+estimate"
    assert energy["fallback"] == "nvml: NVMLError_GpuIsLost: GPU is lost at read 3; continued with estimate"
    assert "CPU seconds" in energy["formula"] and "gpu device" in energy["scope"] and "worker" in energy["scope"]


class FlakyMeter(energy_module.EnergyMeter):
    """Reads 1.0 J, then 2.5 J, then raises."""

    source, key = "nvml", "nvml:GPU-shared"

    def __init__(self):
        self.values = [1.0, 2.5]

    def start(self):
        pass

    def read_joules(self):
        if not self.values:
            raise RuntimeError("Unknown Error")
        return self.values.pop(0)


def test_a_chain_records_where_a_meter_failed_and_counts_a_shared_counter_once(no_rapl):
    def estimate(worker: int) -> CpuTimeEstimateMeter:   # two workers' own processes (here: one, named twice)
        meter = CpuTimeEstimateMeter(10.0)
        meter.key += f":{worker}"
        return meter

    step = {"n": 0}
    workers = [energy_module.MeterChain([("nvml", FlakyMeter), ("estimate", lambda i=i: estimate(i))],
                                        where=lambda: f"step {step['n']}") for i in range(2)]
    for w in workers:
        w.start()
    for step["n"] in (1, 2, 3):
        totals = [w.read_joules() for w in workers]
    burn_cpu()
    assert all(w.read_joules() > 2.5 for w in workers)
    readings = [r for w in workers for r in w.readings()]
    energy = combine(readings)
    # both workers read one GPU: its 2.5 J count once, then each worker's own estimate
    assert [r for r in readings if r["source"] == "nvml"] == \
        [{"key": "nvml:GPU-shared", "joules": 2.5, "source": "nvml", "formula": None}] * 2
    estimates = sum(r["joules"] for r in readings if r["source"] == "estimate")
    assert energy["joules"] == 2.5 + estimates and totals[0] >= 2.5
    assert energy["source"] == "nvml+estimate"
    assert energy["fallback"] == "nvml: RuntimeError: Unknown Error at step 3; continued with estimate"


def fake_powercap(root: Path, uj: int) -> Path:
    zone = root / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)   # a sub-zone (core), inside the package: not counted again
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    (zone / "energy_uj").write_text(f"{uj}\n")
    (zone / "intel-rapl:0:0" / "energy_uj").write_text("5\n")
    return zone


def test_rapl_counts_the_whole_package_across_a_wrap_and_falls_back_when_unreadable(monkeypatch, tmp_path):
    monkeypatch.setattr(energy_module, "POWERCAP", tmp_path)
    zone = fake_powercap(tmp_path, 262_143_000_000)
    meter = make_meter("auto", torch.device("cpu"), 10.0, where=lambda: "step 4")
    assert meter.source == "rapl"
    meter.start()
    (zone / "energy_uj").write_text("1000000\n")   # wrapped: 328,850 uJ to the top, then 1,000,000
    assert meter.read_joules() == pytest.approx(1.32885)
    measured = combine(meter.readings())
    assert measured["scope"] == "package: whole CPU package, other processes included"
    assert "fallback" not in measured and "formula" not in measured
    (zone / "energy_uj").unlink()                  # e.g. a permission change: the run continues
    burn_cpu()
    assert meter.read_joules() >= 1.32885
    energy = combine(meter.readings())
    assert energy["source"] == "rapl+estimate" and energy["joules"] >= 1.32885
    assert energy["fallback"].startswith("rapl: FileNotFoundError") and \
        energy["fallback"].endswith("at step 4; continued with estimate")


def test_a_gpu_without_a_readable_counter_says_why_it_was_not_measured(monkeypatch, no_rapl):
    nvml = FakeNvml(monkeypatch, cuda_visible=[2])
    nvml.lost = True
    with pytest.raises(RuntimeError, match="energy.meter is nvml but NVML is not readable here"):
        make_meter("nvml", torch.device("cuda", 0), 10.0)
    meter = make_meter("auto", torch.device("cuda", 0), 10.0)
    meter.start()
    energy = combine(meter.readings())
    assert energy["source"] == "estimate"
    assert energy["fallback"] == "nvml: NVMLError_GpuIsLost: GPU is lost at start; continued with estimate"


# -- every display of an energy figure says "estimate" when it is one ---------------------------------------------

def rendered(renderable) -> str:
    console = Console(record=True, width=400)
    console.print(renderable)
    return console.export_text()


def energy_of(source: str) -> dict:
    out = combine([{"key": f"{source}:x", "joules": 1921.0, "source": source,
                    "formula": "E = CPU seconds x 10 W" if source == "estimate" else None}])
    return {**out, "train_joules": 1500.0}


SOURCES = [("estimate", True), ("nvml", False), ("rapl", False)]


def a_result(source: str, metrics: dict) -> dict:
    """A whole result.json of a 1-step run whose energy came from `source`."""
    return {"method": "full", "task": "sst2", "model": "tiny-bert", "status": "finished", "metrics": metrics,
            "train_loss": 0.5, "loss_history": [0.5], "loss_history_steps": [1],
            "step_losses": [0.5], "energy": energy_of(source), "workers": 1, "zero_stage": 0,
            "device": "cpu", "total_steps": 1, "output_dir": "x",
            "memory": {"trainable_params": 1, "total_params": 2, "param_bytes": 1, "buffer_bytes": 1, "grad_bytes": 1,
                       "optimizer_state_bytes": 1, "peak_activation_bytes": 1, "tensor_account_bytes": 1,
                       "peak_device_bytes": 1, "peak_device_kind": "cpu_peak_rss_growth", "per": "worker"},
            "time": {"train_seconds": 1.0, "steps": 1, "samples": 8, "samples_per_second": 1.0,
                     "seconds_per_step": 1.0, "seconds_per_sample": 0.125}}


@pytest.mark.parametrize("source, estimated", SOURCES)
def test_the_progress_line_and_summary_table_say_estimate(source, estimated):
    from rayeff.train.progress import progress_line, summary_table

    line = progress_line({"step": 3, "total_steps": 9, "epoch": 0, "loss": 0.5, "samples_per_second": 12.0,
                          "energy_joules": 1921.0, "energy_source": source, "eval": {}})
    assert f"1,921.0 J ({source})" in line and ("estimate" in line) == estimated
    table = rendered(summary_table(a_result(source, metrics={})))
    assert f"1,921.0 J ({source})" in table and f"1,500.0 J ({source})" in table
    assert ("estimate" in table) == estimated and ("whole CPU package" in table) == (source == "rapl")


@pytest.mark.parametrize("source, estimated", SOURCES)
def test_rayeff_status_says_estimate(source, estimated):
    from rayeff.cluster.live import status_text

    line = {"run": "r", "trial": "", "method": "full", "state": "running", "step": 3, "total_steps": 9,
            "energy_joules": 1921.0, "energy_source": source, "power_watts": 12.5, "dev": None, "updated": 100.0}
    text = status_text(line, 101.0)
    assert f"1,921.0 J, 12.5 W ({source})" in text and ("estimate" in text) == estimated


@pytest.mark.parametrize("source, estimated", SOURCES)
def test_bench_tables_say_estimate(source, estimated):
    from rayeff.bench import compare, moe, zo

    from rayeff.results import RunResult

    result = a_result(source, metrics={"accuracy": 0.8})
    results = {"full": result, "lora": result}
    report = {"task": "sst2", "model": "tiny-bert", "primary_metric": "accuracy", "results": results,
              "ratios_to_full": compare.ratios({m: RunResult.model_validate(r) for m, r in results.items()},
                                               "accuracy")}
    table = rendered(compare.comparison_table(report))
    assert f"1,921.0 J ({source})" in table and ("estimate" in table) == estimated

    rows = {name: {"dev": 0.8, "flops_ratio_to_dense": 1.0, "energy_joules_ratio_to_dense": 1.0,
                   "seconds_per_sample_ratio_to_dense": 1.0, "energy_source": source} for name in ("dense", "moe")}
    lines = "\n".join(moe.summary_lines(rows))
    assert "energy x1.000" in lines and ("estimate" in lines) == estimated

    run = {"step_reaching_target": 3, "queries_to_target": 9, "final_dev_metrics": {"accuracy": 0.8},
           "energy": energy_of(source)}
    zo_report = {"task": "sst2", "model": "tiny-bert", "k_shot": 16, "loss_target": 0.6,
                 "a_convergence": {"adazeta": run, "mezo-lora": run},
                 "b_query_parallelism": {"queries_per_step": 8, "parallel_efficiency": 0.9,
                                         "workers_1": {"median_seconds_per_step": 1.0, "step_over_floor": 1.0,
                                                       "seconds_per_forward": 0.06},
                                         "workers_2": {"median_seconds_per_step": 0.6, "step_over_floor": 1.1,
                                                       "seconds_per_forward": 0.07}},
                 "c_memory": {"adazeta_over_inference": 1.01, "full_over_adazeta": 3.0},
                 "d_adapter_time": {"adapter_fraction_of_backbone": 0.02},
                 "e_batched_queries": {"queries": 8, "per_query_batch": {
                     "1": {"seconds_per_step": 1.0, "speedup_over_one_at_a_time": 1.0, "max_abs_g_difference": 0.0}}},
                 "f_scaling_model": {"forward_slowdown_at_2_workers": 1.2, "waiting_seconds_per_step": 0.04,
                                     "at_bench_queries": [], "one_query_per_worker": []}}
    table = rendered(zo.summary_table(zo_report))
    assert f"1,921.0 J ({source})" in table and ("estimate" in table) == estimated


@pytest.mark.parametrize("source, estimated", SOURCES)
def test_rayeff_tune_output_and_the_pareto_axis_say_estimate(source, estimated, monkeypatch, capsys):
    import argparse

    from rayeff import cli
    from rayeff.config import JobSpec
    from rayeff.tune import sweep as sweep_module
    from rayeff.tune.spec import SweepSpec

    trial = {"number": 0, "status": "finished", "objectives": [0.8, 1921.0], "params": {}, "feasible": True,
             "energy": {"joules": 1921.0, "source": source}}
    report = {"best": None, "trials": [trial], "output_dir": "out", "priors": None, "interrupted": False,
              "energy": {"total_j": 1921.0, "sources": [source], "stopped_by": None}}
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: report)
    cli.cmd_tune(argparse.Namespace(sweep="s.yaml", overrides=[], output=None, data_dir=None, address=None,
                                    resume=False, no_progress=False))
    out = capsys.readouterr().out
    assert f"1,921.0 J ({source})" in out and ("estimate" in out) == estimated

    sweep = SweepSpec(base_job="j", search_space="s", num_trials=2,
                      objective=[{"metric": "dev", "mode": "max"}, {"metric": "energy_j", "mode": "min"}])
    job = JobSpec.model_validate({"method": {"name": "full"}, "model": {"name": "tiny-bert"},
                                  "data": {"task": "sst2"}, "output_dir": "o"})
    labels = sweep_module.objective_labels(sweep, job, sweep_module.trial_energy_label([trial], job))
    assert labels[0] == "dev accuracy, max"
    assert labels[1] == ("energy (J, estimate: CPU-s x 10 W), min" if estimated else f"energy (J, {source}), min")


def test_grafana_energy_panels_and_metrics_carry_the_source(monkeypatch):
    import ray.util.metrics

    from rayeff.cluster import live

    dashboard = json.loads((Path(__file__).resolve().parents[1] / "clusters" / "grafana-rayeff.json").read_text())
    energy_panels = [p for p in dashboard["panels"]
                     if any(f"ray_{name}" in t["expr"] for t in p["targets"] for name in live.ENERGY_METRICS)]
    assert len(energy_panels) == len(live.ENERGY_METRICS)
    for panel in energy_panels:
        assert "estimate" in panel["title"]
        for target in panel["targets"]:
            assert "{{source}}" in target["legendFormat"] and ", source)" in target["expr"]

    recorded = []

    class Metric:
        def __init__(self, name, description, tag_keys):
            self.name, self.tag_keys = name, tag_keys

        def set_default_tags(self, tags):
            self.defaults = tags

        def inc(self, value, tags=None):
            recorded.append((self.name, value, {**self.defaults, **(tags or {})}))

        set = inc

    monkeypatch.setattr(ray.util.metrics, "Counter", Metric)
    monkeypatch.setattr(ray.util.metrics, "Gauge", Metric)
    monkeypatch.setattr(live, "status_board", lambda: types.SimpleNamespace(
        put=types.SimpleNamespace(remote=lambda key, line: None)))
    run = live.LiveRun({"run": "r", "trial": "", "method": "full"}, "accuracy", 5000.0, {})
    progress = {"step": 1, "total_steps": 9, "epoch": 0, "loss": None, "samples_per_second": 3.0,
                "energy_joules": 10.0, "energy_source": "estimate", "eval": {}}
    run.update(progress)
    run.update({**progress, "energy_joules": 25.0, "energy_source": "nvml+estimate"})  # a meter fell back
    for name, value, tags in recorded:
        assert set(run.metrics[name].tag_keys) == set(tags)
        assert ("source" in tags) == (name in live.ENERGY_METRICS)
    counter = [(v, t["source"]) for n, v, t in recorded if n == "rayeff_energy_joules"]
    assert counter == [(10.0, "estimate"), (25.0, "nvml+estimate")]   # each series: the run's total


def test_a_run_reports_every_segment_and_meter_it_used(no_rapl):
    """The step meter without Ray: a run resumed from an estimated segment, now on a GPU counter that fails."""
    from rayeff.train.state import TrainState
    from rayeff.train.step_meter import StepMeter

    state = TrainState(step=40, energy_joules=100.0, train_energy_joules=80.0,
                       energy_labels={"source": "estimate", "formula": CpuTimeEstimateMeter(10.0).formula})
    chain = energy_module.MeterChain([("nvml", FlakyMeter), ("estimate", lambda: CpuTimeEstimateMeter(10.0))],
                                     where=lambda: f"step {state.step}")
    meter = StepMeter(chain, torch.device("cpu"))
    meter.start()
    with meter.step(state):                                           # a training step, as the loops count it
        pass
    assert meter.train_joules_by_key == {"nvml:GPU-shared": 1.5}
    state.step = 41
    energy = meter.energy(state)                                      # the GPU's counter fails here
    assert energy["joules"] >= 102.5 and energy["train_joules"] == 81.5
    assert energy["source"] == "nvml+estimate" and energy["formula"] == CpuTimeEstimateMeter(10.0).formula
    assert energy["fallback"] == "nvml: RuntimeError: Unknown Error at step 41; continued with estimate"
    assert state.energy_labels == {k: energy[k] for k in ("source", "formula", "fallback")}   # checkpointed


def test_a_meter_that_fails_before_its_first_read_is_no_source_of_the_figure(monkeypatch, no_rapl):
    nvml = FakeNvml(monkeypatch, cuda_visible=[1])
    meter = make_meter("nvml", torch.device("cuda", 0), 10.0, where=lambda: "step 0")
    nvml.lost = True
    meter.start()
    energy = combine(meter.readings())
    assert energy["source"] == "estimate" and "gpu" not in energy["scope"]
    assert energy["fallback"] == "nvml: NVMLError_GpuIsLost: GPU is lost at step 0; continued with estimate"
