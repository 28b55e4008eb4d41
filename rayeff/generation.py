"""Generation from any causal-LM module (`model(input_ids, attention_mask) -> logits`), greedy or sampled with a
seed, and the SQuAD measures of generated text against a reference: exact match and token F1 after SQuAD's
normalisation."""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: logits / temperature, kept to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p, then drawn. Each prompt draws from its own generator, seeded by `seed` and the
    prompt's tokens, so an answer does not depend on the batch it was in, the worker or the order of the lines."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int = 0

    def generator(self, prompt: list[int]) -> torch.Generator:
        digest = hashlib.sha256(repr((self.seed, prompt)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocabulary) float logits -> the distribution each row draws from."""
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs   # mass of the tokens ranked above each
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)   # the first always stays
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return probs / probs.sum(-1, keepdim=True)


def generate(model: nn.Module, prompts: list[list[int]], pad_id: int, end_id: int | None, max_new_tokens: int,
             stop_early: bool = True, sampling: Sampling | None = None) -> list[list[int]]:
    """Greedy (or, with `sampling`, sampled) decoding of a batch of prompts, left-padded (the model counts
    positions over real tokens): each prompt's new tokens, up to (not including) `end_id`. Every step runs the whole
    sequence again (no cache): one code path for every method's model, at the price of speed on long outputs.
    Without `stop_early` it always runs max_new_tokens forwards, as workers that gather weights collectively
    (ZeRO-3) must, each alike."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    new: list[list[int]] = [[] for _ in prompts]
    generators = [sampling.generator(p) for p in prompts] if sampling is not None else None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask)[:, -1].float()
            step = logits.argmax(-1) if sampling is None else _draw(sampling.probabilities(logits), generators)
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


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row, each from its own (CPU) generator, so a row's draw does not depend on the others."""
    rows = probs.cpu()
    return torch.stack([torch.multinomial(rows[i], 1, generator=g)[0] for i, g in enumerate(generators)]).to(
        probs.device)


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
