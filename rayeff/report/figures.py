"""The report's figures, drawn with matplotlib (Agg: files only, no display on a cluster node). Each function takes
plain figures (a run's result.json, a sweep's trial records, a comparison's results) and returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# The tensor account's kinds, bottom to top of a stacked bar (rayeff/results.py Memory).
ACCOUNT = [("param_bytes", "parameters"), ("buffer_bytes", "buffers"), ("grad_bytes", "gradients"),
           ("optimizer_state_bytes", "optimizer state"), ("peak_activation_bytes", "activations (peak)"),
           ("perturbation_snapshot_bytes", "zeroth-order snapshot")]


def joules_at(steps: list[int], history: list[dict]) -> np.ndarray:
    """The run's energy so far at each of `steps` (the logged steps, where it was read; between two readings, by
    interpolation)."""
    return np.interp(steps, [h["step"] for h in history], [h["joules"] for h in history])


def curves(runs: dict[str, dict], energy_label: str) -> Figure:
    """Training loss (each logged step's mean) and dev metric (each evaluation) of each run, against steps (left)
    and against the run's energy so far (right)."""
    with_eval = any(r.get("eval_history") for r in runs.values())
    fig, axes = plt.subplots(2 if with_eval else 1, 2, figsize=(10, 7 if with_eval else 3.8), dpi=110, squeeze=False)
    for name, r in runs.items():
        steps, losses = logged_steps(r), r["loss_history"]
        axes[0][0].plot(steps, losses, marker=".", label=name)
        if r.get("energy_history"):   # (a result.json from before rayeff kept it has none)
            axes[0][1].plot(joules_at(steps, r["energy_history"]), losses, marker=".", label=name)
        if with_eval and r.get("eval_history"):
            metric = next(iter(r["metrics"]))
            evals = r["eval_history"]
            values = [e["metrics"].get(metric, np.nan) for e in evals]
            axes[1][0].plot([e["step"] for e in evals], values, marker="o", label=f"{name} ({metric})")
            axes[1][1].plot([e["joules"] for e in evals], values, marker="o", label=f"{name} ({metric})")
    for row, what in ((0, "training loss"), (1, "dev metric")):
        if row == 1 and not with_eval:
            break
        axes[row][0].set(xlabel="step", ylabel=what)
        axes[row][1].set(xlabel=energy_label, ylabel=what)
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
            else:   # results written before rayeff kept energy readings (energy_history)
                ax.text(0.5, 0.5, "no energy readings in this result", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def logged_steps(result: dict) -> list[int]:
    """The steps of a result's loss_history entries. Results written before rayeff kept loss_history_steps held one
    entry per step."""
    return result.get("loss_history_steps") or list(range(1, len(result["loss_history"]) + 1))


def memory_bars(memories: dict[str, dict]) -> Figure:
    """Each method's tensor account (one worker, the largest over workers) as stacked bars, in MB, with the device
    peak beside it."""
    names = list(memories)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.4 * len(names) + 3), 4.2), dpi=110)
    bottom = np.zeros(len(names))
    for key, label in ACCOUNT:
        values = np.array([(memories[n].get(key) or 0) / 1e6 for n in names])
        if values.any():
            ax.bar(names, values, bottom=bottom, label=label)
            bottom += values
    peaks = [memories[n]["peak_device_bytes"] / 1e6 for n in names]
    ax.scatter(names, peaks, marker="_", s=900, c="k", label=f"device peak ({memories[names[0]]['peak_device_kind']})")
    ax.set(ylabel="MB per worker", title="tensor account (stacked) and device peak")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def cost_bars(results: dict[str, dict], energy_label: str) -> Figure:
    """Each method's energy (whole run) and training-step time, side by side."""
    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6, 2 * len(names) + 3), 3.6), dpi=110)
    left.bar(names, [results[n]["energy"]["joules"] for n in names], color="tab:orange")
    left.set(ylabel=energy_label, title="energy of the run")
    right.bar(names, [results[n]["time"]["train_seconds"] for n in names], color="tab:green")
    right.set(ylabel="seconds", title="training-step time")
    fig.tight_layout()
    return fig


def trial_scatter(trials: list[dict], front: list[int], labels: list[str]) -> Figure:
    """A sweep's trials: the first objective against the trial number (and, with two objectives, against the
    second, its Pareto front joined up)."""
    two = len(labels) > 1
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11 if two else 6, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    for kind, style in (("feasible", dict(c="tab:blue", marker="o")), ("infeasible", dict(c="tab:red", marker="x")),
                        ("pruned", dict(c="tab:gray", marker="v"))):
        chosen = [t for t in trials if trial_kind(t) == kind and t.get("objectives")]
        if chosen:
            ax.scatter([t["number"] for t in chosen], [t["objectives"][0] for t in chosen], label=kind, **style)
            if two:
                axes[0][1].scatter([t["objectives"][1] for t in chosen], [t["objectives"][0] for t in chosen],
                                   label=kind, **style)
    ax.set(xlabel="trial", ylabel=labels[0], title=f"{len(trials)} trials")
    if two:
        on_front = sorted((t for t in trials if t["number"] in front), key=lambda t: t["objectives"][1])
        if on_front:
            axes[0][1].plot([t["objectives"][1] for t in on_front], [t["objectives"][0] for t in on_front], "k--",
                            marker="D", mfc="none", ms=9, label="Pareto front (Optuna best_trials)")
        axes[0][1].set(xlabel=labels[1], ylabel=labels[0], title=f"{len(on_front)} on the Pareto front")
    for a in axes[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return fig


def trial_kind(trial: dict) -> str:
    if trial.get("feasible"):
        return "feasible"
    return "pruned" if trial.get("status") == "stopped: asha" else "infeasible"


def trial_energy(trials: list[dict], energy_label: str) -> Figure:
    """Each trial's energy, coloured by whether it was feasible."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    colours = {"feasible": "tab:blue", "infeasible": "tab:red", "pruned": "tab:gray"}
    ax.bar([str(t["number"]) for t in trials], [(t.get("energy") or {}).get("joules", 0.0) for t in trials],
           color=[colours[trial_kind(t)] for t in trials])
    ax.set(xlabel="trial", ylabel=energy_label, title="energy per trial")
    fig.tight_layout()
    return fig
