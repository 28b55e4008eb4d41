"""Dev-set evaluation, the same for every loop."""

from __future__ import annotations

import torch
from torch import nn

from rayeff.data.metrics import compute_metrics
from rayeff.train.collectives import all_gather
from rayeff.train.context import TrainContext
from rayeff.train.run_setup import RunSetup
from rayeff.train.state import batches_of, epoch_order


def evaluate(module: nn.Module, run: RunSetup, ctx: TrainContext) -> dict[str, float]:
    """Dev metrics of `module` (the model, or an engine around it). Every worker runs the same number of forwards
    (ZeRO-3 gathers weights collectively), on its interleaved shard; predictions are gathered by example index so
    padding duplicates count once."""
    order = epoch_order(len(run.dev_set), ctx.rank, ctx.world_size, 0, 0, shuffle=False)
    predictions = {}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for idx in batches_of(order, run.job.micro_batch_size()):
            logits = module(**run.batch(idx, ctx.device, split="dev")).float()
            preds = logits.squeeze(-1) if run.task.is_regression else logits.argmax(-1)
            predictions.update(zip(idx, preds.cpu().tolist()))
    module.train(was_training)
    merged = {}
    for part in all_gather(predictions):
        merged.update(part)
    keys = sorted(merged)
    labels = run.dev_set["label"]
    return compute_metrics(run.task.metrics, [merged[k] for k in keys], [labels[k] for k in keys])
