"""Greedy generation from any causal-LM module (`model(input_ids, attention_mask) -> logits`), and the SQuAD
measures of generated text against a reference: exact match and token F1 after SQuAD's normalisation."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from torch import nn


def greedy_generate(model: nn.Module, prompts: list[list[int]], pad_id: int, end_id: int | None,
                    max_new_tokens: int, stop_early: bool = True) -> list[list[int]]:
    """Greedy decoding of a batch of prompts, left-padded (the model counts positions over real tokens): each
    prompt's new tokens, up to (not including) `end_id`. Every step runs the whole sequence again (no cache): one
    code path for every method's model, at the price of speed on long outputs. Without `stop_early` it always
    runs max_new_tokens forwards, as workers that gather weights collectively (ZeRO-3) must, each alike."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            step = model(input_ids=ids, attention_mask=mask)[:, -1].float().argmax(-1)
            for row, token in enumerate(step.tolist()):
                if not done[row]:
                    if token == end_id:
                        done[row] = True
                    else:
                        new[row].append(token)
            if stop_early and bool(done.all()):
                break
            ids = torch.cat([ids, step.unsqueeze(1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(step).unsqueeze(1)], dim=1)
    return new


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """The harmonic mean of token precision and recall over the normalised words (both empty: 1)."""
    pred, ref = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
