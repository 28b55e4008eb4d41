"""AdaZeta (arXiv 2406.18060): tensor-train bottleneck adapters on a frozen backbone, trained by zeroth-order SPSA
with a number of queries per step that grows over training (rayeff/train/zeroth_order.py runs it).

    adapter(h) = h + up(act(down(h)))     down: d -> b, up: b -> d, both TTLinear of rank `tt_rank`; up starts at 0

Placement (Houlsby): after the attention-output and the FFN-output projections of every layer for encoders and
encoder-decoders; decoder-only models get one on the MLP output. The adapters attach as forward hooks on those
projections, so the backbone's own modules are untouched. They and the head train in float32 whatever precision
the backbone runs in, and the residual stream they add to stays float32. Because the last core of each
up-projection starts at zero, the adapted model computes exactly what the backbone does until the first update.

    rayeff run jobs/sst2-adazeta.yaml --data-dir ../shared/data/glue
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rayeff.errors import UserError
from rayeff.methods.registry import EVERY_TASK_TYPE, MethodDefinition, register_method
from rayeff.methods.zeroth_order_config import ZerothOrderConfig, check_zeroth_order_job
from rayeff.models import SequenceClassifier, autocast_off
from rayeff.tensor_train import TTLinear, dense_flops, tt_apply, tt_halves
from rayeff.train.spsa import MAX_QUERIES

# Output projections by role, as module-path patterns of the architectures rayeff supports
# (BERT-style encoders, T5, GPT-2, Llama-style decoders).
ATTENTION_OUTPUTS = (r"attention\.output\.dense$", r"SelfAttention\.o$", r"EncDecAttention\.o$", r"attn\.c_proj$",
                     r"self_attn\.o_proj$")
FFN_OUTPUTS = (r"layer\.\d+\.output\.dense$", r"DenseReluDense\.wo$", r"mlp\.c_proj$", r"mlp\.down_proj$")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class AdaZetaConfig(ZerothOrderConfig):
    name: Literal["adazeta"] = "adazeta"
    bottleneck: int = Field(64, gt=0, description="adapter width b")
    tt_rank: int = Field(5, gt=0, description="rank of the tensor-train cores")
    placement: Literal["auto", "houlsby", "ffn", "attention"] = Field(
        "auto", description="auto: houlsby (attention and FFN outputs) for encoders, ffn for decoder-only models")
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    train_norms: bool = Field(False, description="also train the backbone's LayerNorm/RMSNorm weights")
    # The reference schedule: alpha 0.85, beta derived from Q at the last epoch, at most 16 queries.
    alpha: float = Field(0.85, gt=0)
    beta: float | None = Field(None, ge=0, description="None derives it from q_target")
    q_target: int | None = Field(8, ge=1)
    q_max: int = Field(16, ge=1, le=MAX_QUERIES)


class TTAdapter(nn.Module):
    def __init__(self, width: int, config: AdaZetaConfig):
        super().__init__()
        self.down = TTLinear(width, config.bottleneck, config.tt_rank)
        self.act = ACTIVATIONS[config.activation]()
        self.up = TTLinear(config.bottleneck, width, config.tt_rank, zero_last_core=True)

    def forward(self, h: torch.Tensor, down: tuple, up: tuple) -> torch.Tensor:
        """h + up(act(down(h))) in float32, the sum too, whatever the backbone's dtype (a bf16/fp16 backbone runs
        under autocast, rayeff/train/zeroth_order.py): rounded to bf16, an adapter change of 1e-3 against
        activations near 1 would vanish (bf16 keeps 8 bits), and with it the SPSA difference. `down` and `up` are
        the projections' merged (A^T, B) halves (AdaZetaModel merges every adapter's at once, per forward)."""
        with autocast_off(h.device):
            h = h.float()
            return h + tt_apply(self.act(tt_apply(h, *down, self.down.bias)), *up, self.up.bias)


def _out_width(module: nn.Module) -> int | None:
    """Output features of a projection: nn.Linear's `out_features`, GPT-2 Conv1D's `nf`."""
    return getattr(module, "out_features", None) or getattr(module, "nf", None)


def adapter_sites(backbone: nn.Module, placement: str, kind: str) -> list[tuple[str, nn.Module]]:
    if placement == "auto":
        placement = "ffn" if kind == "decoder" else "houlsby"
    patterns = {"houlsby": ATTENTION_OUTPUTS + FFN_OUTPUTS, "ffn": FFN_OUTPUTS, "attention": ATTENTION_OUTPUTS}
    wanted = [re.compile(p) for p in patterns[placement]]
    return [(name, m) for name, m in backbone.named_modules()
            if _out_width(m) and any(p.search(name) for p in wanted)]


class AdaZetaModel(nn.Module):
    """The classifier with TT adapters hooked onto its backbone's output projections."""

    def __init__(self, classifier: SequenceClassifier, config: AdaZetaConfig):
        super().__init__()
        self.classifier = classifier
        classifier.freeze_backbone()
        if config.train_norms:
            for module in classifier.backbone.modules():
                if "norm" in type(module).__name__.lower():
                    module.requires_grad_(True)
        sites = adapter_sites(classifier.backbone, config.placement, classifier.kind)
        if not sites:
            raise UserError(f"method.placement: {config.placement} finds no output projection in this "
                            f"{classifier.backbone.config.model_type} model; rayeff knows BERT-style encoders, "
                            "T5, GPT-2 and Llama-style decoders")
        self.adapters = nn.ModuleDict()
        for name, module in sites:
            key = name.replace(".", "__")
            self.adapters[key] = TTAdapter(_out_width(module), config)
            module.register_forward_hook(lambda _m, _inputs, output, key=key: self.adapters[key](output,
                                                                                                *self.halves[key]))
        self.layer_groups = same_shaped_layers(self.adapters)
        self.halves: dict[str, tuple] = {}   # during a forward: each adapter's (down, up) halves

    def forward(self, **batch) -> torch.Tensor:
        with autocast_off(batch["input_ids"].device):   # merged in float32, as the adapters train
            self.halves = merge_all(self.adapters, self.layer_groups)
        try:
            return self.classifier(**batch)
        finally:
            self.halves = {}

    def figures(self) -> dict:
        """The adapters' size and cost against dense bottleneck adapters of the same shapes (per token: the
        per-row multiply-adds; merging the cores is a per-forward constant, reported apart)."""
        tt_params = dense_params = per_token = merge = dense_per_token = 0
        for adapter in self.adapters.values():
            for layer in (adapter.down, adapter.up):
                tt_params += layer.parameter_count()
                dense_params += layer.in_features * layer.out_features + layer.out_features
                per_token += layer.flops(2) - layer.flops(1)
                merge += layer.flops(1) - (layer.flops(2) - layer.flops(1))
                dense_per_token += dense_flops(layer.in_features, layer.out_features)
        return {"adapters": len(self.adapters), "tt_params": tt_params, "dense_adapter_params": dense_params,
                "params_ratio_tt_to_dense": tt_params / dense_params, "flops_per_token": per_token,
                "dense_flops_per_token": dense_per_token, "flops_ratio_tt_to_dense": per_token / dense_per_token,
                "merge_flops_per_forward": merge}


def same_shaped_layers(adapters: nn.ModuleDict) -> list[list[tuple[str, int]]]:
    """The adapters' TT layers as (adapter key, 0 for down or 1 for up), grouped by the shapes of their cores: each
    group's cores merge as one batched chain."""
    groups: dict[tuple, list] = {}
    for key, adapter in adapters.items():
        for slot, layer in enumerate((adapter.down, adapter.up)):
            shape = (len(layer.in_modes), layer.out_features, tuple(tuple(c.shape) for c in layer.cores))
            groups.setdefault(shape, []).append((key, slot))
    return list(groups.values())


def merge_all(adapters: nn.ModuleDict, groups: list[list[tuple[str, int]]]) -> dict[str, tuple]:
    """Every adapter's merged (A^T, B) halves, down and up: one matmul per core position for each group of
    same-shaped layers rather than one per core of each layer (24 adapters x ~10 cores of small kernels took more
    time than the adapters' own GEMMs). Under torch.func.vmap the cores carry a query dimension and this batches
    over it too."""
    halves: dict[str, list] = {key: [None, None] for key in adapters}
    for group in groups:
        layers = [(adapters[key].down, adapters[key].up)[slot] for key, slot in group]
        first = layers[0]
        cores = [torch.stack([layer.cores[k] for layer in layers]) for k in range(len(first.cores))]
        a_t, b = tt_halves(cores, len(first.in_modes), first.out_features)
        for i, (key, slot) in enumerate(group):
            halves[key][slot] = (a_t[i], b[i])
    return {key: tuple(pair) for key, pair in halves.items()}


def build(classifier: SequenceClassifier, config: AdaZetaConfig) -> nn.Module:
    return AdaZetaModel(classifier, config)


register_method(MethodDefinition("adazeta", AdaZetaConfig, build, loop="zeroth_order", check_job=check_zeroth_order_job,
                                 figures=AdaZetaModel.figures,
                                 task_types=EVERY_TASK_TYPE))
