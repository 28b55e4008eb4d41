"""What a worker trains, built the same way on every worker: the job, its method's definition, the task, the
tokenised train and dev sets, the collator, and the method's model (rayeff/methods). The loops take it from here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rayeff.config import JobSpec
from rayeff.data.task import CausalLMTask, LabelledTask, PromptedTask, task_of
from rayeff.data.tokenized import IGNORE_INDEX, Collator, label_word_ids, load_train_and_dev, prompt_scoring
from rayeff.errors import UserError
from rayeff.measure.memory import DevicePeak
from rayeff.methods import MethodDefinition, get_method
from rayeff.models import (
    CausalLM,
    ModelSource,
    PromptedClassifier,
    build_classifier,
    load_language_model,
    load_tokenizer,
    packing_isolates_examples,
)


@dataclass
class RunSetup:
    job: JobSpec
    method: MethodDefinition
    task: LabelledTask | PromptedTask | CausalLMTask
    train_set: object     # tokenised datasets (Hugging Face `datasets`), indexed by example
    dev_set: object
    collate: Collator
    model: nn.Module      # the method's module, on the CPU as built
    routing_layers: list  # its Mixture-of-Experts layers (the method's `routing` hook), else empty
    device_peak: DevicePeak   # peak device memory from before the data and model were loaded
    tokenizer: object     # to read generated text back (causal LM)

    @classmethod
    def build(cls, job: JobSpec, source: ModelSource, device: torch.device) -> RunSetup:
        device_peak = DevicePeak(device)
        method, task = get_method(job.method.name), task_of(job.data)
        torch.manual_seed(job.training.seed)  # the same initial weights on every worker
        tokenizer = load_tokenizer(source)
        _, base = build_base(source, task, job, tokenizer)
        scoring = prompt_scoring(base.kind) if task.kind == "prompted" else None
        train_set, dev_set = load_train_and_dev(job.data, tokenizer, job.training.max_seq_length, scoring)
        collate = Collator(tokenizer.pad_token_id, job.training.max_seq_length, job.training.padding == "max_length",
                           base.uses_token_types, task.is_regression)
        model = method.build(base, job.method)
        routing = method.routing(model) if method.routing is not None else []
        return cls(job, method, task, train_set, dev_set, collate, model, routing, device_peak, tokenizer)

    def batch(self, idx: list[int], device: torch.device, split: str = "train") -> dict:
        """The examples `idx` of the train (or dev) set as one padded batch on `device`."""
        dataset = self.train_set if split == "train" else self.dev_set
        collated = self.collate([dict(dataset[i], index=i) for i in idx])
        return {k: v.to(device, non_blocking=True) for k, v in collated.items()}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task's training loss: mean squared error for regression (STS-B), cross-entropy of the class for
        classification, and for a causal LM the mean cross-entropy of each learned token given those before it."""
        if self.task.kind == "causal_lm":
            return token_losses(logits, labels).sum() / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        if self.task.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)


def build_base(source: ModelSource, task, job: JobSpec, tokenizer) -> tuple[nn.Module | None, nn.Module]:
    """(the Hugging Face language model inside it, or None for a classifier; the model every method builds on): a
    SequenceClassifier, a CausalLM, or a PromptedClassifier. The caller seeds first, so a tiny random-weight
    backbone and a new head come out the same on every worker, and again when a run is rebuilt."""
    if task.kind == "causal_lm":
        lm = load_language_model(source, job.model.dropout)
        model = CausalLM(lm)
        if job.data.packing and not packing_isolates_examples(model):
            raise UserError(f"data.packing: {job.model.name} ({lm.config.model_type}) lets packed examples attend to "
                            "each other (transformers builds no per-example mask for it); set data.packing false")
        return lm, model
    if task.kind == "prompted":
        lm = load_language_model(source, job.model.dropout)
        return lm, PromptedClassifier(lm, label_word_ids(tokenizer, task), tokenizer.mask_token_id)
    return None, build_classifier(source, task.num_labels, job.model.dropout, job.model.pooling, job.model.head)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, tokens - 1) cross-entropy of each next token (position t predicts t + 1), 0 where it is not learned."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(targets.shape)
