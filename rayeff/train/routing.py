"""The routing record of a Mixture-of-Experts run (rayeff/methods/moe.py): each layer's training load between
evaluations, summed over workers, kept in the run's state and reported in result.json's `moe.routing`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rayeff.mixture_of_experts import RouterStatistics, coefficient_of_variation
from rayeff.train.collectives import all_gather
from rayeff.train.state import TrainState


def record_routing(layers: list[RouterStatistics], state: TrainState) -> None:
    """The layers' training load since the last record, summed over workers: per-expert assignments and their
    coefficient of variation, the fraction dropped for capacity, and the latest auxiliary losses (the mean of the
    workers' terms: the global batch's loss). A collective when there are layers."""
    if not layers:
        return
    counts = all_gather([(*layer.take_counts(), float(layer.aux_loss), float(layer.z_loss)) for layer in layers])
    records = []
    for i, layer in enumerate(layers):
        load = [sum(worker[i][0][e] for worker in counts) for e in range(layer.num_experts)]
        dropped, assigned, aux, z = (sum(worker[i][j] for worker in counts) for j in (1, 2, 3, 4))
        records.append({"load": load, "load_cv": coefficient_of_variation(load),
                        "dropped_fraction": dropped / max(assigned, 1), "aux_loss": aux / len(counts),
                        "z_loss": z / len(counts)})
    if sum(sum(x["load"]) for x in records):
        state.extra.setdefault("moe_routing", []).append(
            {"step": state.step, "load_cv": float(np.mean([x["load_cv"] for x in records])),
             "dropped_fraction": float(np.mean([x["dropped_fraction"] for x in records])), "layers": records})


def record_untrained_routing(layers: list[RouterStatistics], module: nn.Module, batch: dict, device: torch.device,
                             state: TrainState) -> None:
    """The routing of the untrained routers (step 0) on the first training batch: a forward in training mode
    without gradients, with the RNG state put back so the run itself is unchanged."""
    if not layers:
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        module.train()
        module(**batch)
    record_routing(layers, state)
