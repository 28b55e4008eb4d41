"""Mixture-of-Experts fine-tuning, of a model that has MoE blocks or of a dense one turned into one (upcycling).

    method: {name: moe, aux_loss_coef: 0.01}                                        # Mixtral, Qwen2-MoE, Switch, ...
    method: {name: moe, upcycle: {experts: 4, top_k: 1, every: 2}, expert_parallel: true}    # BERT, GPT-2, Llama, T5

Upcycling: every n-th feed-forward block becomes E experts, each a copy of that block (plus optional noise), behind a
learned top-k router (rayeff/mixture_of_experts.py). With identical experts (noise 0), no token dropped and top-k
of 2 or more (or top-1 with `top1_gate: straight_through`), the upcycled model computes exactly what the dense one
did, so fine-tuning starts from the dense model's quality; Switch's top-1 gate (`probability`, the default) scales
each expert's output by its router probability. Blocks
found per architecture: BERT-style encoders (intermediate + output projection; the residual LayerNorm stays shared),
GPT-2 and Llama blocks (`mlp`), T5 (`DenseReluDense`, encoder then decoder). With `expert_parallel`, each of W
workers holds E / W of every layer's experts (rayeff/train/expert_optimizer.py steps them).

A native MoE model keeps its own blocks; its routers are watched (NativeRouter), so the same auxiliary losses join
the task loss and the same load figures are reported. Both kinds can train everything, only the experts and
routers, or LoRA adapters on the experts, with the routers frozen or not.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from rayeff.errors import UserError
from rayeff.methods.registry import EVERY_TASK_TYPE, MethodConfig, MethodDefinition, register_method
from rayeff.mixture_of_experts import MoEFeedForward, NativeRouter, RouterStatistics, moe_layers
from rayeff.spec_base import Spec


class UpcycleSpec(Spec):
    experts: int = Field(ge=2, description="experts per upcycled block")
    top_k: int = Field(1, ge=1, description="experts each token is routed to")
    every: int = Field(1, ge=1, description="upcycle every n-th feed-forward block (the n-th, 2n-th, ...)")
    noise: float = Field(0.0, ge=0.0, description="std of Gaussian noise added to each expert's copy, relative to "
                                                  "the std of the weight it perturbs")
    capacity_factor: float | None = Field(1.25, gt=0, description="expert capacity, in multiples of an even share "
                                                                  "of a batch's assignments; null: no token dropped")
    top1_gate: Literal["probability", "straight_through"] = Field(
        "probability", description="top_k 1 only: gate the expert by its router probability p (Switch Transformer), "
                                   "or by p / stop_grad(p), which is 1 (the upcycled model starts as the dense one) "
                                   "with p's gradient")

    @model_validator(mode="after")
    def _k_of_e(self) -> UpcycleSpec:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed experts ({self.experts})")
        return self


class ExpertLoraSpec(Spec):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)


class MoEConfig(MethodConfig):
    name: Literal["moe"] = "moe"
    upcycle: UpcycleSpec | None = Field(None, description="turn a dense backbone's feed-forward blocks into experts; "
                                                          "leave out for a model that has MoE blocks already")
    aux_loss_coef: float = Field(0.01, ge=0.0, description="weight of the load-balancing loss (Switch: 0.01)")
    z_loss_coef: float = Field(0.0, ge=0.0, description="weight of the router z-loss (ST-MoE: 0.001)")
    trainable: Literal["all", "experts", "lora"] = Field(
        "all", description="all: every weight; experts: the experts, routers and head only; lora: LoRA adapters "
                           "on the experts, with the routers and head")
    lora: ExpertLoraSpec = Field(default_factory=ExpertLoraSpec, description="the adapters of trainable: lora")
    freeze_router: bool = Field(False, description="keep the routers at their initial weights")
    expert_parallel: bool = Field(False, description="split each upcycled layer's experts over the workers (E / W "
                                                     "each, tokens exchanged by all-to-all) instead of replicating")


def check_job(config: MoEConfig, job) -> None:
    """The job rules of method moe (its MethodDefinition's `check_job`)."""
    if job.deepspeed.zero_stage == 3:
        raise ValueError("deepspeed.zero_stage: method moe supports ZeRO stages 0, 1 and 2 (ZeRO-3 gathers "
                         "each weight collectively when its module runs, and which experts run depends on each "
                         "worker's tokens); set zero_stage to 2 or lower")
    if not config.expert_parallel:
        return
    if config.upcycle is None:
        raise ValueError("method.expert_parallel: experts are split over workers for upcycled layers only "
                         "(a native MoE model's experts are replicated); set upcycle or drop expert_parallel")
    if config.trainable == "lora":
        raise ValueError("method.trainable: lora is not combined with expert_parallel; use all or experts")
    workers = job.scaling.num_workers
    if config.upcycle.experts % workers:
        raise ValueError(f"method.upcycle.experts: {config.upcycle.experts} experts cannot be split evenly over "
                         f"scaling.num_workers ({workers}) with expert_parallel; use a multiple of {workers}")
    if job.deepspeed.zero_stage == 0:
        raise ValueError("deepspeed.zero_stage: expert_parallel needs ZeRO stage 1 or 2 (at stage 0 DeepSpeed "
                         "all-reduces every gradient, which would mix different workers' experts); set 1 or 2")
    if job.deepspeed.precision != "fp32":
        raise ValueError(f"deepspeed.precision: expert_parallel trains in fp32 only (its experts are stepped "
                         f"outside DeepSpeed's mixed-precision optimizer); set fp32, not {job.deepspeed.precision}")


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
                               spec.capacity_factor, aux_loss_coef, z_loss_coef, spec.top1_gate)
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


def native_routers(backbone: nn.Module) -> list[tuple[nn.Module, nn.Module, int]]:
    """A Hugging Face MoE model's routers: (router, its block's experts, index of the logits in its output), found
    through the router class the model itself records `router_logits` from."""
    recorders = {(r.target_class, r.index) for m in backbone.modules()
                 for r in [(getattr(m, "_can_record_outputs", None) or {}).get("router_logits")] if r is not None}
    found = []
    for name, module in backbone.named_modules():
        for router_class, index in recorders:
            if isinstance(module, router_class):
                block = backbone.get_submodule(name.rpartition(".")[0])
                if not isinstance(getattr(block, "experts", None), nn.Module):
                    raise UserError(f"model: the router {name} has no `experts` beside it, where rayeff looks for "
                                    f"the experts of {backbone.config.model_type} blocks; this model is not supported")
                found.append((module, block.experts, index))
    return found


def build(classifier: nn.Module, config: MoEConfig) -> nn.Module:
    if config.upcycle is not None:
        layers = upcycle(classifier.backbone, config.upcycle, config.aux_loss_coef, config.z_loss_coef)
        routers, experts = [layer.router for layer in layers], [layer.experts for layer in layers]
        for layer in layers:
            layer.expert_parallel = config.expert_parallel   # the loop splits them over its workers
    else:
        found = native_routers(classifier.backbone)
        layers = [NativeRouter(router, block_experts, index, config.aux_loss_coef, config.z_loss_coef)
                  for router, block_experts, index in found]
        classifier.routers = nn.ModuleList(layers)   # owned by the classifier: moved, and put in train mode, with it
        routers, experts = [f[0] for f in found], [f[1] for f in found]
    share_token_mask(classifier, layers)
    classifier.requires_grad_(config.trainable == "all")
    if config.trainable == "lora":
        _add_expert_lora(classifier, experts, config.lora)
    else:
        for module in experts:
            module.requires_grad_(True)
    for router in routers:
        router.requires_grad_(not config.freeze_router)
    classifier.head.requires_grad_(classifier.trains_head)   # a new classifier head trains; a pretrained LM head not
    return classifier


def _add_expert_lora(classifier: nn.Module, experts: list[nn.Module], spec: ExpertLoraSpec) -> None:
    """LoRA adapters (PEFT) on every expert: on their nn.Linear projections, and on fused expert weights (one 3-D
    tensor for all E experts, as Mixtral keeps them) through PEFT's `target_parameters`."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {id(m): n for n, m in classifier.backbone.named_modules()}
    modules, parameters = [], []
    for block_experts in experts:
        prefix = names[id(block_experts)]
        modules += [f"{prefix}.{n}" for n, m in block_experts.named_modules() if isinstance(m, nn.Linear)]
        parameters += [f"{prefix}.{n}" for n, p in block_experts.named_parameters(recurse=False) if p.dim() == 3]
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=modules or [],
                        target_parameters=parameters or None)
    inject_adapter_in_model(config, classifier.backbone)   # adds trainable A/B; the rest is frozen above


def share_token_mask(classifier: nn.Module, layers: list[RouterStatistics]) -> None:
    """Before each forward, hand the layers the batch's attention mask, so that padding is not routed: it would
    count in the load and the auxiliary losses, and take expert capacity."""
    def hand_over(_module, _args, kwargs):
        for layer in layers:
            layer.token_mask = kwargs.get("attention_mask")

    classifier.register_forward_pre_hook(hand_over, with_kwargs=True)


def check(config: MoEConfig, backbone: nn.Module) -> None:
    """Before anything runs, against the backbone built without weights: a native MoE model is not upcycled again,
    a dense one is, and the blocks `every` selects exist."""
    native = native_routers(backbone)
    kind = backbone.config.model_type
    if native and config.upcycle is not None:
        raise UserError(f"method.upcycle: {kind} has Mixture-of-Experts blocks already ({len(native)} routers); "
                        "leave upcycle out to fine-tune them")
    if not native and config.upcycle is None:
        raise UserError(f"method.upcycle: {kind} has no Mixture-of-Experts blocks; set upcycle: {{experts: 4}} to "
                        "turn its feed-forward blocks into experts")
    if config.upcycle is not None:
        chosen_sites(backbone, config.upcycle)


register_method(MethodDefinition("moe", MoEConfig, build, loop="first_order", check_job=check_job, check_model=check,
                                 routing=moe_layers, task_types=EVERY_TASK_TYPE))
