"""LoRA through PEFT: low-rank adapters on the backbone's projections; adapters and head train.

Target modules default to PEFT's own choice for the backbone's architecture (e.g. query/value for BERT).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from rayeff.methods.registry import EVERY_TASK_TYPE, MethodConfig, MethodDefinition, register_method


class LoraMethodConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, description="module names to adapt; None: PEFT's default")


def build(classifier: nn.Module, config: LoraMethodConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules)
    classifier.backbone = get_peft_model(classifier.backbone, lora)  # freezes the backbone, adds trainable A/B
    classifier.head.requires_grad_(classifier.trains_head)   # a new classifier head trains; a pretrained LM head not
    return classifier


register_method(MethodDefinition("lora", LoraMethodConfig, build, loop="first_order",
                                 task_types=EVERY_TASK_TYPE))
