"""The fields and job rules every zeroth-order method (adazeta, mezo) shares; the SPSA engine itself
(rayeff/train/spsa.py) takes plain numbers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from rayeff.methods.registry import MethodConfig
from rayeff.train.spsa import MAX_QUERIES, MAX_RUN_SEED, MAX_STEPS, QuerySchedule


class ZerothOrderConfig(MethodConfig):
    """Fields every zeroth-order method shares: the SPSA step and the query schedule
    Q_k = min(max(floor(alpha * k^beta), 1), q_max), k = 1, 2, ... counting epochs (default) or steps."""

    eps: float = Field(1e-3, gt=0, description="perturbation scale")
    alpha: float = Field(1.0, gt=0, description="query schedule: Q_k = min(max(floor(alpha k^beta), 1), q_max)")
    beta: float | None = Field(0.0, ge=0, description="schedule exponent; None derives it from q_target")
    q_target: int | None = Field(None, ge=1, description="queries wanted at the last epoch (or step): sets beta")
    q_max: int = Field(1, ge=1, le=MAX_QUERIES, description="most queries per step")
    schedule_over: Literal["epochs", "steps"] = "epochs"
    query_batch: PositiveInt | Literal["auto"] = Field(
        "auto", description="queries evaluated in one batched forward (rayeff/train/query_batch.py); auto: on a GPU "
        "as many as its free memory holds, up to a worker's share of q_max, on a CPU 1; N workers end bitwise "
        "equal to one for a given number")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="Sparse-MeZO: fraction of each weight "
                                   "matrix's largest-magnitude entries left out of perturbation and update")

    @model_validator(mode="before")
    @classmethod
    def _one_given_clears_the_other(cls, data):
        """Giving beta drops the default q_target and vice versa (so a dumped config validates again)."""
        if isinstance(data, dict):
            for given, other in (("beta", "q_target"), ("q_target", "beta")):
                if data.get(given) is not None and other not in data:
                    data = {**data, other: None}
        return data

    @model_validator(mode="after")
    def _beta_or_target(self):
        if self.beta is None and self.q_target is None:
            raise ValueError("set beta, or q_target to derive it from")
        if self.beta is not None and self.q_target is not None:
            raise ValueError("set beta or q_target, not both")
        return self


def check_zeroth_order_job(config: ZerothOrderConfig, job) -> None:
    """The job rules of a zeroth-order method (a MethodDefinition's `check_job`)."""
    # SPSA packs (run seed, step, query) into one 63-bit seed: each field has its bits, checked here rather than at
    # the step that would overflow them.
    if job.training.seed >= MAX_RUN_SEED:
        raise ValueError(f"training.seed: {job.training.seed} is too large for method {config.name}, whose query "
                         f"seeds hold the run seed in 23 bits; use a seed below {MAX_RUN_SEED}")
    if job.training.max_steps is not None and job.training.max_steps >= MAX_STEPS:
        raise ValueError(f"training.max_steps: {job.training.max_steps} is too many for method {config.name}, whose "
                         f"query seeds hold the step in 28 bits; use fewer than {MAX_STEPS}")
    # Every worker evaluates its own queries on the whole batch, and there is no gradient or optimizer state for
    # ZeRO to partition.
    ds = job.deepspeed
    if ds.zero_stage != 0 or ds.offload_optimizer or ds.offload_params:
        raise ValueError(f"deepspeed: method {config.name} trains without gradients or optimizer state, which ZeRO "
                         "partitions; set deepspeed.zero_stage: 0 and no offload")


def query_schedule(config: ZerothOrderConfig, total_steps: int, steps_per_epoch: int) -> QuerySchedule:
    """The run's query schedule (every worker reads the whole global batch, so an epoch is ceil(n / batch) steps);
    a ValueError naming q_target when the run is too short to reach it."""
    return QuerySchedule(config.alpha, config.beta, config.q_target, config.q_max, config.schedule_over,
                         total_epochs=-(-total_steps // steps_per_epoch), total_steps=total_steps)
