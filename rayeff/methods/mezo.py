"""MeZO (arXiv 2305.17333) and its variants, the baselines AdaZeta is measured against: the same zeroth-order SPSA
step as adazeta (rayeff/train/zeroth_order.py) on a different set of trainable parameters.

    target: full    every weight of backbone and head (MeZO; lr about 1e-6 to 1e-7)
    target: lora    LoRA A/B on the backbone plus the head (MeZO-LoRA; lr about 1e-4, rank 8, alpha 16)
    sparsity: s     Sparse-MeZO: perturb and update only the (1 - s) smallest-magnitude entries of each matrix

The query count is the shared schedule's; MeZO's single query is its default (alpha 1, beta 0, q_max 1), and n
queries a step are alpha = q_max = n.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from rayeff.methods.lora import LoraMethodConfig
from rayeff.methods.lora import build as build_lora
from rayeff.methods.registry import EVERY_TASK_TYPE, MethodDefinition, register_method
from rayeff.methods.zeroth_order_config import ZerothOrderConfig, check_zeroth_order_job
from rayeff.models import SequenceClassifier


class MezoConfig(ZerothOrderConfig):
    name: Literal["mezo"] = "mezo"
    target: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_target_modules: list[str] | None = Field(None, description="modules LoRA adapts; None: PEFT's default")


def build(classifier: SequenceClassifier, config: MezoConfig) -> nn.Module:
    if config.target == "lora":
        lora = LoraMethodConfig(rank=config.lora_rank, alpha=config.lora_alpha,
                                target_modules=config.lora_target_modules)
        return build_lora(classifier, lora)
    classifier.requires_grad_(True)
    return classifier


register_method(MethodDefinition("mezo", MezoConfig, build, loop="zeroth_order", check_job=check_zeroth_order_job,
                                 task_types=EVERY_TASK_TYPE))
