"""Full fine-tuning: every weight of backbone and head trains (under DeepSpeed ZeRO, stage from the job)."""

from __future__ import annotations

from typing import Literal

from torch import nn

from rayeff.methods.registry import EVERY_TASK_TYPE, MethodConfig, MethodDefinition, register_method


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"


def build(classifier: nn.Module, config: FullConfig) -> nn.Module:
    classifier.requires_grad_(True)
    return classifier


register_method(MethodDefinition("full", FullConfig, build, loop="first_order",
                                 task_types=EVERY_TASK_TYPE))
