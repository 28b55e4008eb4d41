"""What a live run tells the cluster at every log step: Prometheus metrics for the Ray dashboard's Grafana
(through `ray.util.metrics`), and a line on the status board that `rayeff status` prints.

Only rank 0 of a run's workers reports, with figures already reduced over all workers (energy is the run's
total). Metrics carry the labels run (the output folder's name, or the sweep's), trial (Tune's trial id, empty for
a plain run) and method; the energy metrics also carry source (nvml, rapl, estimate, or e.g. nvml+estimate after a
meter fell back), since only the run knows whether its joules are measured. Ray adds its own labels (node,
session). The Grafana dashboard in clusters/grafana-rayeff.json plots them, with the source in every energy
legend.
"""

from __future__ import annotations

import time

from rayeff.measure.energy import energy_label
from rayeff.results import Progress

LABELS = ("run", "trial", "method")
SOURCE_LABEL = "source"
BOARD_NAME, BOARD_NAMESPACE = "rayeff-status-board", "rayeff"
METRICS = {   # name -> (kind, description); Ray exports each as ray_<name>
    "rayeff_energy_joules": ("counter", "Energy drawn by the run so far, over all workers (see energy source)"),
    "rayeff_power_watts": ("gauge", "Mean power over the last log interval, over all workers"),
    "rayeff_samples_per_second": ("gauge", "Training samples per second of training-step time"),
    "rayeff_zo_queries_per_second": ("gauge", "Zeroth-order (SPSA) queries per second, over all workers"),
    "rayeff_train_loss": ("gauge", "Training loss, mean over the last log interval"),
    "rayeff_dev_metric": ("gauge", "Latest dev value of the task's primary metric"),
    "rayeff_trial_energy_remaining_joules": ("gauge", "Energy left in the run's (trial's) budget"),
    "rayeff_sweep_energy_remaining_joules": ("gauge", "Energy left in the sweep's budget"),
}
ENERGY_METRICS = {"rayeff_energy_joules", "rayeff_power_watts", "rayeff_trial_energy_remaining_joules",
                  "rayeff_sweep_energy_remaining_joules"}   # labelled with the energy's source


class StatusBoard:
    """The latest line of every run and trial on the cluster: one detached Ray actor (no CPU) that rank-0 workers
    write to and `rayeff status` reads. Plain methods, so tests can call it directly."""

    def __init__(self):
        self.lines: dict[str, dict] = {}

    def put(self, key: str, line: dict) -> None:
        self.lines[key] = line

    def snapshot(self) -> list[dict]:
        return sorted(self.lines.values(), key=lambda line: line["started"])


def status_board():
    """The cluster's board actor, created by whichever run comes first."""
    import ray

    return ray.remote(num_cpus=0)(StatusBoard).options(name=BOARD_NAME, namespace=BOARD_NAMESPACE,
                                                       lifetime="detached", get_if_exists=True).remote()


class LiveRun:
    """Rank 0's reporter: call `update` at each log step and `end` with the final status."""

    def __init__(self, labels: dict[str, str], dev_metric: str, budget_j: float | None, details: dict):
        from ray.util import metrics

        self.labels, self.dev_metric, self.budget_j = labels, dev_metric, budget_j
        self.metrics = {}
        for name, (kind, description) in METRICS.items():
            tag_keys = LABELS + ((SOURCE_LABEL,) if name in ENERGY_METRICS else ())
            metric = (metrics.Counter if kind == "counter" else metrics.Gauge)(name, description, tag_keys=tag_keys)
            metric.set_default_tags(labels)
            self.metrics[name] = metric
        self.board = status_board()
        self.key = f"{labels['run']}/{labels['trial']}" if labels["trial"] else labels["run"]
        self.line = {**labels, **details, "started": time.time(), "state": "running"}
        # Energy already added to the counter, per source: a source that appears mid-run (a meter fell back)
        # starts its own series at the run's whole total, so each series is the run's energy while so labelled.
        self.counted_j: dict[str, float] = {}
        self.last = None   # (time, joules) of the last update

    def update(self, progress: dict, sweep_remaining_j: float | None = None) -> None:
        """Publish a `Progress` (rayeff/results.py) as metrics and on the status board."""
        p = Progress.model_validate(progress)
        now, joules = time.monotonic(), p.energy_joules
        m, source = self.metrics, {SOURCE_LABEL: p.energy_source or "unknown"}
        counted = self.counted_j.get(source[SOURCE_LABEL], 0.0)
        if joules > counted:   # a counter only grows (and Ray refuses an increment of 0)
            m["rayeff_energy_joules"].inc(joules - counted, tags=source)
            self.counted_j[source[SOURCE_LABEL]] = joules
        power = None
        if self.last is not None and now > self.last[0]:
            power = (joules - self.last[1]) / (now - self.last[0])
            m["rayeff_power_watts"].set(power, tags=source)
        self.last = (now, joules)
        m["rayeff_samples_per_second"].set(p.samples_per_second)
        if p.queries_per_second is not None:
            m["rayeff_zo_queries_per_second"].set(p.queries_per_second)
        if p.loss is not None:
            m["rayeff_train_loss"].set(p.loss)
        dev = (p.eval or {}).get(self.dev_metric)
        if dev is not None:
            m["rayeff_dev_metric"].set(dev)
        if self.budget_j is not None:
            m["rayeff_trial_energy_remaining_joules"].set(max(self.budget_j - joules, 0.0), tags=source)
        if sweep_remaining_j is not None:
            m["rayeff_sweep_energy_remaining_joules"].set(sweep_remaining_j, tags=source)
        self.line.update(step=p.step, total_steps=p.total_steps, energy_joules=joules,
                         energy_source=p.energy_source, power_watts=power, loss=p.loss,
                         dev=dev, samples_per_second=p.samples_per_second, updated=time.time())
        self.board.put.remote(self.key, dict(self.line))

    def end(self, status: str, energy_joules: float) -> None:
        self.line.update(state=status, energy_joules=energy_joules, updated=time.time())
        self.board.put.remote(self.key, dict(self.line))


def status_text(line: dict, now: float) -> str:
    """One board line as `rayeff status` prints it; its energy (and power) say "estimate" when estimated."""
    trial = f" trial {line['trial']}" if line["trial"] else ""
    dev = "" if line.get("dev") is None else f"  dev {line['dev']:.4f}"
    energy = energy_label({"joules": line["energy_joules"], "source": line.get("energy_source")},
                          line.get("power_watts"))
    return (f"{line['run']}{trial}  {line['method']}  {line['state']}  step {line['step']}/{line['total_steps']}  "
            f"{energy}{dev}  updated {now - line['updated']:.0f} s ago")
