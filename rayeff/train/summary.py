"""A run's summary: what its final report carries and result.json keeps (metrics, losses, energy, memory, time), built
and checked against its schema (rayeff/results.py `RunResult`) here, where it is made."""

from __future__ import annotations

from rayeff.measure.memory import DevicePeak
from rayeff.mixture_of_experts import parameter_figures
from rayeff.results import RunResult
from rayeff.train.collectives import all_gather
from rayeff.train.context import TrainContext
from rayeff.train.run_setup import RunSetup
from rayeff.train.state import TrainState


def memory_figures(account: dict, device_peak: DevicePeak) -> dict:
    """The tensor account (bytes by kind, rayeff/measure/memory.py) and the device peak, the largest over workers
    (a collective)."""
    per_worker = all_gather({**account, "peak_device_bytes": device_peak.peak_bytes()})
    memory = {k: max(w[k] for w in per_worker) for k in per_worker[0]}
    memory["tensor_account_bytes"] = sum(memory[k] for k in memory if k.endswith("_bytes")
                                         and k != "peak_device_bytes")
    memory["peak_device_kind"] = device_peak.kind
    memory["per"] = "worker (largest over workers)"
    return memory


def logged_losses(losses: list[float], log_every: int) -> dict:
    """One entry per logged step (every log_every steps, and the last step): the mean training loss since the
    previous one (at a last step off the log_every grid, over fewer steps than the progress line's window)."""
    ends = list(range(log_every, len(losses) + 1, log_every))
    if losses and (not ends or ends[-1] != len(losses)):
        ends.append(len(losses))
    starts = [0] + ends[:-1]
    return {"loss_history": [sum(losses[a:b]) / (b - a) for a, b in zip(starts, ends)], "loss_history_steps": ends}


def final_reading(history: list[dict], step: int, energy: dict) -> list[dict]:
    """The energy history ending at the last step: a run stopped off the training.log_every grid gets the final
    reading there (taken after the final evaluation, so that point includes it)."""
    if history and history[-1]["step"] == step:
        return history
    return [*history, {"step": step, "joules": energy["joules"]}]


def run_summary(run: RunSetup, ctx: TrainContext, state: TrainState, status: str, metrics: dict, energy: dict,
                memory: dict, total_steps: int, loop_figures: dict | None = None) -> dict:
    """The final report's summary (a `RunResult`, as a dict); `loop_figures` adds a loop's own section (the
    zeroth-order loop's `zeroth_order`). A figure that does not fit the schema is a pydantic ValidationError."""
    s, job = state, run.job
    result = RunResult(
        status=status, method=job.method.name, model=job.model.name, task=run.task.name, metrics=metrics,
        train_loss=s.loss_sum / max(s.step, 1), **logged_losses(s.losses, job.training.log_every),
        step_losses=s.losses, energy=energy, energy_history=final_reading(s.energy_history, s.step, energy),
        eval_history=[*s.eval_history, s.evaluation(metrics, energy)],
        memory=memory,
        time={"train_seconds": s.train_seconds, "steps": s.step, "samples": s.samples,
              "samples_per_second": s.samples / max(s.train_seconds, 1e-9),
              "seconds_per_step": s.train_seconds / max(s.step, 1),
              "seconds_per_sample": s.train_seconds / max(s.samples, 1), "resumed_at_steps": s.resumed_at_steps},
        workers=ctx.world_size, zero_stage=job.deepspeed.zero_stage, device=ctx.device.type,
        total_steps=total_steps, **(loop_figures or {}),
        **({"moe": {**parameter_figures(run.model), "routing": s.extra.get("moe_routing", [])}}
           if run.routing_layers else {}),
        **({"method_figures": run.method.figures(run.model)} if run.method.figures is not None else {}),
    )
    return result.dump()
