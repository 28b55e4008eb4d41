"""Mixture-of-Experts fine-tuning by upcycling: every n-th feed-forward block of a dense backbone becomes E experts,
each a copy of that block (plus optional noise), behind a learned top-k router (rayeff/mixture_of_experts.py).

    method: {name: moe, upcycle: {experts: 4, top_k: 1, every: 2}, aux_loss_coef: 0.01}

With identical experts (noise 0) and no token dropped, the upcycled model computes exactly what the dense one did,
so fine-tuning starts from the dense model's quality. Blocks found per architecture: BERT-style encoders
(intermediate + output projection; the residual LayerNorm stays shared), GPT-2 and Llama blocks (`mlp`), T5
(`DenseReluDense`, encoder then decoder).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from rayeff.config import MethodConfig, Spec
from rayeff.errors import UserError
from rayeff.methods import MethodDefinition, register_method
from rayeff.mixture_of_experts import MoEFeedForward


class UpcycleSpec(Spec):
    experts: int = Field(ge=2, description="experts per upcycled block")
    top_k: int = Field(1, ge=1, description="experts each token is routed to")
    every: int = Field(1, ge=1, description="upcycle every n-th feed-forward block (the n-th, 2n-th, ...)")
    noise: float = Field(0.0, ge=0.0, description="std of Gaussian noise added to each expert's copy, relative to "
                                                  "the std of the weight it perturbs")
    capacity_factor: float | None = Field(1.25, gt=0, description="expert capacity, in multiples of an even share "
                                                                  "of a batch's assignments; null: no token dropped")

    @model_validator(mode="after")
    def _k_of_e(self) -> UpcycleSpec:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        return self


class MoEConfig(MethodConfig):
    name: Literal["moe"] = "moe"
    upcycle: UpcycleSpec
    aux_loss_coef: float = Field(0.01, ge=0.0, description="weight of the load-balancing loss (Switch: 0.01)")
    z_loss_coef: float = Field(0.0, ge=0.0, description="weight of the router z-loss (ST-MoE: 0.001)")
    trainable: Literal["all", "experts"] = Field(
        "all", description="all: every weight; experts: the experts, routers and head only")
    freeze_router: bool = Field(False, description="keep the routers at their initial weights")

    def check_job(self, job) -> None:
        if job.deepspeed.zero_stage == 3:
            raise ValueError("deepspeed.zero_stage: method moe supports ZeRO stages 0, 1 and 2 (DeepSpeed-MoE "
                             "partitions expert weights within expert-parallel groups, which ZeRO-3 does not); "
                             "set zero_stage to 2 or lower")


def ffn_sites(backbone: nn.Module) -> list[tuple[nn.Module, str]]:
    """The feed-forward blocks, in order: (owner module, architecture style)."""
    sites = []
    for module in backbone.modules():
        if hasattr(module, "intermediate") and hasattr(getattr(module, "output", None), "dense"):
            sites.append((module, "bert"))
        elif isinstance(getattr(module, "mlp", None), nn.Module):
            sites.append((module, "mlp"))
        elif isinstance(getattr(module, "DenseReluDense", None), nn.Module):
            sites.append((module, "t5"))
    return sites


def _expert_copies(block: nn.Module, count: int, noise: float) -> list[nn.Module]:
    experts = [copy.deepcopy(block) for _ in range(count)]
    if noise > 0:
        with torch.no_grad():
            for expert in experts:
                for p in expert.parameters():
                    if p.dim() > 1:
                        p.add_(torch.randn_like(p) * noise * p.std())
    return experts


def chosen_sites(backbone: nn.Module, spec: UpcycleSpec) -> list[tuple[nn.Module, str]]:
    """The n-th, 2n-th, ... feed-forward blocks; a UserError when `every` selects none."""
    sites = ffn_sites(backbone)
    if spec.every > len(sites):
        raise UserError(f"method.upcycle.every: {spec.every} selects none of the backbone's {len(sites)} "
                        f"feed-forward blocks; use 1 to {max(len(sites), 1)}")
    return sites[spec.every - 1::spec.every]


def upcycle(backbone: nn.Module, spec: UpcycleSpec, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0
            ) -> list[MoEFeedForward]:
    """Replace every `spec.every`-th feed-forward block with an MoE layer of copies of it; returns the new layers."""
    def moe_of(block: nn.Module, width: int) -> MoEFeedForward:
        layer = MoEFeedForward(_expert_copies(block, spec.experts, spec.noise), width, spec.top_k,
                               spec.capacity_factor, aux_loss_coef, z_loss_coef)
        return layer.to(next(block.parameters()).dtype)

    layers = []
    for owner, style in chosen_sites(backbone, spec):
        if style == "bert":   # expert = intermediate (dense + activation) + output projection; LayerNorm stays
            owner.intermediate = moe_of(nn.Sequential(owner.intermediate, owner.output.dense),
                                        owner.output.dense.out_features)
            owner.output.dense = nn.Identity()
            layers.append(owner.intermediate)
        elif style == "mlp":
            owner.mlp = moe_of(owner.mlp, _width(owner.mlp))
            layers.append(owner.mlp)
        else:
            owner.DenseReluDense = moe_of(owner.DenseReluDense, _width(owner.DenseReluDense))
            layers.append(owner.DenseReluDense)
    return layers


def _width(block: nn.Module) -> int:
    """Input width of a feed-forward block: the first projection's input features (nn.Linear or GPT-2's Conv1D)."""
    first = next(m for m in block.modules() if hasattr(m, "weight") and m.weight.dim() == 2)
    return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]


def build(classifier: nn.Module, config: MoEConfig) -> nn.Module:
    layers = upcycle(classifier.backbone, config.upcycle, config.aux_loss_coef, config.z_loss_coef)
    classifier.requires_grad_(config.trainable == "all")
    for layer in layers:
        layer.requires_grad_(True)
        layer.router.requires_grad_(not config.freeze_router)
    classifier.head.requires_grad_(True)
    return classifier


def check(config: MoEConfig, backbone: nn.Module) -> None:
    """Before anything runs: the blocks `every` selects exist in this backbone (built without weights)."""
    chosen_sites(backbone, config.upcycle)


register_method(MethodDefinition("moe", MoEConfig, build, check))
