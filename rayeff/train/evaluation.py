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
                scores = _generation_scores(module, run, idx) if run.job.data.eval_max_new_tokens else [()] * len(idx)
                predictions.update(zip(idx, (o + g for o, g in zip(zip(losses.cpu().tolist(),
                                                                        tokens.cpu().tolist()), scores))))
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


def language_model_metrics(outcomes: list[tuple]) -> dict[str, float]:
    """eval_loss: the mean cross-entropy per learned dev token (every token weighs the same, however its example is
    split); perplexity: its exponential; with generation, the mean exact match and token F1 per example."""
    total, tokens = sum(o[0] for o in outcomes), sum(o[1] for o in outcomes)
    loss = total / max(tokens, 1)
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if outcomes and len(outcomes[0]) == 4:
        metrics["exact_match"] = sum(o[2] for o in outcomes) / len(outcomes)
        metrics["token_f1"] = sum(o[3] for o in outcomes) / len(outcomes)
    return metrics


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]]:
    """A tokenised dev example's prompt (every token before the first learned one) and reference (that first run of
    learned tokens, its end token dropped by the caller's decoding): the response, or a chat's first reply."""
    labels = example["labels"]
    # none learned (a chat whose reply truncation cut off): the whole example is prompt, the reference empty
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    last = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return example["input_ids"][:first], labels[first:last]


def _generation_scores(module: nn.Module, run: RunSetup, idx: list[int]) -> list[tuple[float, float]]:
    """(exact match, token F1) of the greedy (or sampled) answer to each dev prompt against its reference. Every
    worker runs all max_new_tokens steps (ZeRO-3 gathers weights in each forward, collectively)."""
    from rayeff.data.tokenized import end_token
    from rayeff.generation import Sampling, exact_match, generate, token_f1

    tokenizer, data = run.tokenizer, run.job.data
    pairs = [prompt_and_reference(run.dev_set[i]) for i in idx]
    sampling = None
    if data.eval_temperature > 0:
        sampling = Sampling(data.eval_temperature, data.eval_top_p, data.eval_top_k, run.job.training.seed)
    generated = generate(module, [p for p, _ in pairs], tokenizer.pad_token_id, end_token(tokenizer),
                         data.eval_max_new_tokens, stop_early=False, sampling=sampling)
    out = []
    for tokens, (_, reference) in zip(generated, pairs):
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        truth = tokenizer.decode(reference, skip_special_tokens=True)
        out.append((exact_match(answer, truth), token_f1(answer, truth)))
    return out
