"""The one schema of what a run reports: its progress while it trains (`Progress`) and its final summary, which
OUTPUT/result.json keeps (`RunResult`). The workers build them here (rayeff/train/reporter.py, summary.py), so a
wrong figure fails where it is made; every reader (the runner, the progress display, the cluster's live metrics,
`rayeff bench`, `rayeff tune`) reads them back through the same models:

    result = RunResult.model_validate(json.loads(Path("runs/job/result.json").read_text()))
    result.energy.joules, result.memory.tensor_account_bytes, result.zeroth_order.queries_total

They travel as plain dicts (a Ray queue, Ray Train and Tune reports, JSON): `dump` gives that dict. It keeps the
keys that were given and no others, so an optional section a run does not have (`zeroth_order`, `moe`,
`method_figures`, `weights`, energy's `formula` and `fallback`) stays absent rather than null, and
`RunResult.model_validate(d).dump() == d`. Numbers stay Python floats (a diverged run's NaN loss included).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Figures(BaseModel):
    """A section of a report: its fields are all it may hold (an unknown key is refused where it is made)."""

    model_config = ConfigDict(extra="forbid")

    def dump(self) -> dict:
        """The plain dict that travels and that result.json holds: the keys given, nested sections as dicts."""
        return self.model_dump(exclude_unset=True)


# -- progress, while the run trains --------------------------------------------------------------------------------

class Progress(Figures):
    """Rank 0's progress at a log step or checkpoint: on the driver's display queue (rayeff/train/progress.py),
    the cluster's live metrics (rayeff/cluster/live.py), and each Ray Train report as `{"progress": ...}`, from
    which a sweep reads its intermediate objectives (rayeff/tune/trial.py)."""

    step: int = Field(description="optimizer steps done")
    total_steps: int = Field(description="the run's length in steps")
    epoch: int = Field(description="the current epoch (from 0)")
    loss: float | None = Field(description="mean training loss over the last training.log_every steps; "
                                           "null before the first step")
    samples_per_second: float = Field(description="training samples per second of training-step time so far")
    energy_joules: float = Field(description="energy of the whole run so far, over all workers")
    energy_source: str = Field(description="what measured it: nvml, rapl or estimate, joined by + after a fallback")
    eval: dict[str, float] | None = Field(None, description="the last evaluation's dev metrics (empty before the "
                                                            "first)")
    queries: int | None = Field(None, description="zeroth-order runs: SPSA queries of the last step")
    queries_per_second: float | None = Field(None, description="zeroth-order runs: queries per second of "
                                                               "training-step time so far")
    trial: str | None = Field(None, description="a sweep's trial (Tune's trial id), on the sweep driver's display "
                                                "queue only")


# -- the final summary: result.json ---------------------------------------------------------------------------------

class Energy(Figures):
    """Energy of the run over all workers (rayeff/measure/energy.py `combine`, rayeff/train/step_meter.py)."""

    joules: float = Field(description="energy of the whole run: start-up, training, evaluation and checkpoints")
    source: str = Field(description="nvml, rapl or estimate; several joined by + when a meter fell back")
    scope: str | None = Field(None, description="what the joules cover, per source")
    formula: str | None = Field(None, description="how an estimate was made (present when a source is estimate)")
    fallback: str | None = Field(None, description="why a meter was given up, and which one continued")
    train_joules: float = Field(description="energy of the training steps alone (no start-up, evaluation or "
                                            "checkpointing)")


class EnergyReading(Figures):
    """The run's energy at a logged step (the reading its progress line shows)."""

    step: int = Field(description="the step it was read after")
    joules: float = Field(description="energy of the whole run so far, over all workers")


class Evaluation(Figures):
    """One evaluation on the dev set, and the run's energy when it ended."""

    step: int = Field(description="the step it evaluated")
    joules: float = Field(description="energy of the whole run so far, over all workers, evaluation included")
    metrics: dict[str, float] = Field(description="the dev metrics, by the task's metric names")
    train_joules: float | None = Field(None, description="energy of the training steps alone up to this step "
                                                         "(no start-up, evaluation or checkpointing)")
    train_seconds: float | None = Field(None, description="time in training steps up to this step")


class Memory(Figures):
    """The tensor account of one worker, the largest over workers (rayeff/measure/memory.py), and the device's
    peak (rayeff/train/summary.py `memory_figures`)."""

    trainable_params: int = Field(description="parameters that train")
    total_params: int = Field(description="all parameters of the model as trained")
    param_bytes: int = Field(description="bytes of parameters this worker holds (ZeRO-3: its partitions)")
    buffer_bytes: int = Field(description="bytes of the model's buffers")
    grad_bytes: int = Field(description="bytes of gradients (including DeepSpeed's partitions and buckets)")
    optimizer_state_bytes: int = Field(description="bytes of optimizer state, float32 master weights included")
    peak_activation_bytes: int = Field(description="peak bytes of activations saved for backward")
    perturbation_snapshot_bytes: int | None = Field(None, description="zeroth-order runs: bytes of the trained "
                                                                      "parameters' copy kept for the exact restore")
    peak_device_bytes: int = Field(description="peak device memory (see peak_device_kind)")
    tensor_account_bytes: int = Field(description="the sum of the account's *_bytes figures (not the peak)")
    peak_device_kind: str = Field(description="cuda_max_allocated, or cpu_peak_rss_growth on a CPU")
    per: str = Field(description="what the figures are per: a worker, the largest over workers")


class Timing(Figures):
    """Training-step time (no start-up, evaluation or checkpointing), over the whole run (resumes included)."""

    train_seconds: float = Field(description="seconds spent in training steps")
    steps: int = Field(description="optimizer steps done")
    samples: int = Field(description="training samples seen (the global batch, summed over steps)")
    samples_per_second: float = Field(description="samples / train_seconds")
    seconds_per_step: float = Field(description="train_seconds / steps")
    seconds_per_sample: float = Field(description="train_seconds / samples")
    resumed_at_steps: list[int] = Field([], description="the step of each checkpoint the run was resumed from "
                                        "(--resume, a restarted worker, a sweep's continued trial), in order")


class QueryScheduleFigures(Figures):
    """The SPSA query schedule Q(k) = min(q_max, ceil(alpha k^beta)) (rayeff/train/spsa.py)."""

    alpha: float = Field(description="the schedule's scale")
    beta: float | None = Field(description="its exponent (derived from q_target when that is given)")
    q_max: int = Field(description="the most queries in one step")
    over: str = Field(description="what k counts: epochs or steps")
    k_last: int = Field(description="the last epoch or step of the run")
    note: str | None = Field(None, description="why the schedule counts steps where epochs were asked for")


class ZerothOrderFigures(Figures):
    """SPSA queries and their cost, of a zeroth-order run (rayeff/train/zeroth_order.py)."""

    queries_total: int = Field(description="SPSA queries over the run")
    queries_last_step: int = Field(description="queries of the last step")
    queries_per_second: float = Field(description="queries per second of training-step time")
    forward_passes_per_step: float = Field(description="forward passes per step over all workers (2 per query)")
    forward_passes_per_worker_per_step: float = Field(description="forward passes per step of the busiest worker")
    query_batch: int = Field(1, description="queries evaluated in one batched forward (1: one at a time)")
    forward_calls_per_worker_per_step: float = Field(0.0, description="forwards the busiest worker ran per step: "
                                                     "2 per query one at a time, one per group of query_batch")
    exchange_bytes_per_step: float = Field(description="bytes exchanged between workers per step (0 on one)")
    step_seconds: list[float] = Field(description="each step's seconds")
    step_queries: list[int] = Field(description="each step's queries")
    step_forward_seconds: list[float] = Field([], description="each step's seconds in forward passes (rank 0)")
    seconds_per_forward: float | None = Field(None, description="measured seconds per forward pass (rank 0; a "
                                              "batched forward of 2B parameter sets counts 2B)")
    step_over_floor: float | None = Field(None, description="step time over its floor: the busiest worker's "
                                          "forward passes at seconds_per_forward and nothing else")
    median_step_seconds_outside_forwards: float | None = Field(
        None, description="median over steps of the seconds not spent in forward passes (perturbing, updating, "
        "exchanging, waiting)")
    schedule: QueryScheduleFigures = Field(description="the query schedule")
    eps: float = Field(description="the perturbation scale")
    queries_split: str = Field(description="how a step's queries are shared among workers")


class LayerRouting(Figures):
    """One MoE layer's training load since the previous record, summed over workers (rayeff/train/routing.py)."""

    load: list[int] = Field(description="tokens assigned to each expert")
    load_cv: float = Field(description="coefficient of variation of the load: 0 for perfect balance")
    dropped_fraction: float = Field(description="fraction of assignments dropped for capacity")
    aux_loss: float = Field(description="the latest load-balancing auxiliary loss")
    z_loss: float = Field(description="the latest router z-loss")


class RoutingRecord(Figures):
    """The routing of every MoE layer at one evaluation (step 0: the untrained routers)."""

    step: int = Field(description="the step it was recorded at")
    load_cv: float = Field(description="mean of the layers' load_cv")
    dropped_fraction: float = Field(description="mean of the layers' dropped_fraction")
    layers: list[LayerRouting] = Field(description="each MoE layer's record")


class MoEFigures(Figures):
    """Parameters and FLOPs of a Mixture-of-Experts model and of its dense counterpart
    (rayeff/mixture_of_experts.py `parameter_figures`), and its routing record."""

    total_params: int = Field(description="all parameters, experts held on other workers included")
    active_params_per_token: int = Field(description="parameters a token passes through (top-k experts)")
    dense_params: int = Field(description="parameters of the dense model upcycling started from")
    flops_per_token: int = Field(description="forward FLOPs per token (estimate: see flops_formula)")
    dense_flops_per_token: int = Field(description="the dense model's forward FLOPs per token")
    flops_ratio_to_dense: float = Field(description="flops_per_token / dense_flops_per_token")
    flops_formula: str = Field(description="how the FLOPs are estimated")
    routing: list[RoutingRecord] = Field(description="the routing record, one entry per evaluation")


class RunResult(Figures):
    """A run's final summary: the last Ray Train report of its workers (rayeff/train/summary.py), completed by the
    driver (`output_dir`, `job`, `weights`: rayeff/train/runner.py `finish`) and written as OUTPUT/result.json."""

    status: str = Field(description="finished, or `stopped: <why>` (energy budget, sweep limits, diverged, asha)")
    method: str = Field(description="the method's name (method.name of the job)")
    model: str = Field(description="the model's name (model.name of the job)")
    task: str = Field(description="the data's name: the GLUE task, data.name, or the file's or dataset's name")
    metrics: dict[str, float] = Field(description="the final dev metrics, by the task's metric names")
    train_loss: float = Field(description="mean training loss over all steps")
    loss_history: list[float] = Field(description="one entry per logged step (training.log_every, and the last "
                                                   "step): the mean training loss since the previous one")
    loss_history_steps: list[int] = Field(description="the step of each loss_history entry")
    step_losses: list[float] = Field(description="every step's training loss")
    energy: Energy = Field(description="energy of the run")
    energy_history: list[EnergyReading] = Field(
        default_factory=list, description="the run's energy at each logged step, and at the last (to draw loss "
                                          "against joules)")
    eval_history: list[Evaluation] = Field(
        default_factory=list, description="each evaluation: every training.eval_every steps, and the final one (the "
                                          "run's `metrics`)")
    memory: Memory = Field(description="memory of one worker, the largest over workers")
    time: Timing = Field(description="training-step time")
    workers: int = Field(description="Ray Train workers")
    zero_stage: int = Field(description="DeepSpeed ZeRO stage")
    device: str = Field(description="the workers' device type: cpu or cuda")
    total_steps: int = Field(description="the run's planned length in steps")
    zeroth_order: ZerothOrderFigures | None = Field(None, description="zeroth-order runs: queries and their cost")
    moe: MoEFigures | None = Field(None, description="Mixture-of-Experts runs: parameters, FLOPs and routing")
    method_figures: dict[str, Any] | None = Field(None, description="the method's own figures (a method's "
                                                                    "`figures` hook, rayeff/methods/registry.py)")
    output_dir: str | None = Field(None, description="the output folder (added by the driver)")
    job: dict[str, Any] | None = Field(None, description="the job as run, as job.yaml holds it (rayeff/config.py "
                                                         "JobSpec; added by the driver)")
    weights: str | None = Field(None, description="the trained parameters' file, when the run left a final "
                                                  "checkpoint (added by the driver)")


class TrialSummary(Figures):
    """What a sweep keeps of a trial's RunResult (rayeff/tune/trial.py): the figures below, each null where the
    trial has none (a failed trial has only a status)."""

    status: str = Field(description="as RunResult.status, or `error: ...` for a trial that failed")
    metrics: dict[str, float] | None = Field(None, description="as RunResult.metrics")
    energy: Energy | None = Field(None, description="as RunResult.energy")
    memory: Memory | None = Field(None, description="as RunResult.memory")
    time: Timing | None = Field(None, description="as RunResult.time")
    output_dir: str | None = Field(None, description="as RunResult.output_dir")

    @classmethod
    def of(cls, result: RunResult) -> TrialSummary:
        return cls(**{name: getattr(result, name) for name in cls.model_fields})

    def record(self) -> dict:
        """Every field, null where absent (a section as its own `dump`): what Tune's final report of a trial and
        sweep.json hold."""
        return {name: value.dump() if isinstance(value, Figures) else value
                for name, value in ((name, getattr(self, name)) for name in type(self).model_fields)}
