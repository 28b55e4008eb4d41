"""Dev-set evaluation, the same for every loop."""

from __future__ import annotations

import math

import torch
from torch import nn

from rayeff.data.metrics import compute_metrics
from rayeff.data.tokenized import IGNORE_INDEX
from rayeff.train.collectives import all_gather
from rayeff.train.context import TrainContext
from rayeff.train.run_setup import RunSetup, token_losses
from rayeff.train.state import batches_of, epoch_order


def evaluate(module: nn.Module, run: RunSetup, ctx: TrainContext) -> dict[str, float]:
    """Dev metrics of `module` (the model, or an engine around it). Every worker runs the same number of forwards
    (ZeRO-3 gathers weights collectively), on its interleaved shard; each example's outcome (its prediction, or for
    a causal LM its summed loss and token count) is gathered by example index so padding duplicates count once."""
    order = epoch_order(len(run.dev_set), ctx.rank, ctx.world_size, 0, 0, shuffle=False)
    predictions = {}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for idx in batches_of(order, run.job.micro_batch_size()):
            batch = run.batch(idx, ctx.device, split="dev")
            logits = module(**batch).float()
            if run.task.kind == "causal_lm":
                losses = token_losses(logits, batch["labels"]).sum(-1)
                tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1)
                predictions.update(zip(idx, zip(losses.cpu().tolist(), tokens.cpu().tolist())))
                continue
            preds = logits.squeeze(-1) if run.task.is_regression else logits.argmax(-1)
            predictions.update(zip(idx, preds.cpu().tolist()))
    module.train(was_training)
    merged = {}
    for part in all_gather(predictions):
        merged.update(part)
    keys = sorted(merged)
    if run.task.kind == "causal_lm":
        return language_model_metrics([merged[k] for k in keys])
    labels = run.dev_set["label"]
    return compute_metrics(run.task.metrics, [merged[k] for k in keys], [labels[k] for k in keys])


def language_model_metrics(outcomes: list[tuple[float, int]]) -> dict[str, float]:
    """eval_loss: the mean cross-entropy per learned dev token (every token weighs the same, however its example is
    split); perplexity: its exponential."""
    total, tokens = sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
