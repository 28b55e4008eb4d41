"""A job's method model built on the meta device from the model's config alone (no weights are read or allocated,
so a 70B model plans on a laptop), the bytes one forward of one worker's batch saves for backward, and the
floating-point operations and operator calls of that forward and its backward (`meta_step`).

The forward runs on meta tensors, which carry shapes and dtypes but no data. It is the method's own forward, so
what it saves is what that method saves (READ's side network only, LoRA's factors and the backbone's activations,
...). It reads full-length sequences without padding, the largest batch a worker sees, so the backbone is called
without an attention mask, as transformers calls it when a batch has no padding (its mask checks read data).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rayeff.config import JobSpec
from rayeff.data.task import task_of
from rayeff.errors import UserError
from rayeff.methods import get_method
from rayeff.models import CausalLM, SequenceClassifier, model_config, resolve_model
from rayeff.plan.calibration import Work, count_work
from rayeff.train.first_order import TORCH_LINEAR
from rayeff.train.run_setup import token_losses


TORCH_ATTENTION = F.scaled_dot_product_attention


@dataclass(frozen=True)
class ModelShapes:
    total_params: int
    trainable_params: int
    trainable_tensors: int
    frozen_matrix_params: int     # frozen floating-point tensors of 2+ dims: a zeroth-order run casts these
    buffer_bytes: int             # as built (position ids and the like; a bf16 run may hold float buffers in bf16)
    saved_activation_bytes: int   # one worker's batch, in the dtype the forward ran in; 0 for zeroth-order methods
    forward_flops: int            # one forward and loss of one worker's batch
    backward_flops: int           # its backward; 0 for zeroth-order methods
    forward_ops: int              # operator calls of that forward and loss
    backward_ops: int             # ... of its backward


def plan_model_config(name: str):
    """The config of `model.name`: a config.json file, a folder holding one (weights need not be there), or any
    model rayeff resolves (a tiny alias, MiniLM)."""
    from transformers import AutoConfig

    path = Path(name)
    if path.is_file() and path.suffix == ".json" or path.is_dir() and (path / "config.json").is_file():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"model.name: {path}: its config cannot be read ({str(err).splitlines()[0]})") from None
    return model_config(resolve_model(name))


def method_model_on_meta(job: JobSpec, config) -> tuple[nn.Module, nn.Module]:
    """(the method's model, the model it was built on), every tensor on the meta device."""
    from transformers import AutoModel, AutoModelForCausalLM

    task = task_of(job.data)
    if task.kind == "prompted":
        raise UserError("data.task_type: prompted_classification is not planned yet (its head needs the "
                        "tokenizer's label words); plan the job as classification for its memory")
    with torch.device("meta"):
        try:
            if task.kind == "causal_lm":
                base = CausalLM(AutoModelForCausalLM.from_config(config))
            else:
                labels = 1 if task.is_regression else task.num_labels
                base = SequenceClassifier(AutoModel.from_config(config), labels, job.model.dropout,
                                          job.model.pooling, job.model.head)
        except ValueError as err:   # transformers: no such model class for this config and task
            raise UserError(f"model.name: {job.model.name} cannot be built for a {task.kind} task "
                            f"({str(err).splitlines()[0][:200]})") from None
        return get_method(job.method.name).build(base, job.method), base


def every_element_nonzero():
    """Boolean indexing on meta tensors (READ selects the real tokens with the attention mask) needs a size that
    depends on data; this torch switch (torch.fx.experimental._config, written against torch 2.13) sizes it as if
    every element were nonzero, which is the plan's case: every token real. The one torch internal rayeff uses."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "meta_nonzero_assume_all_nonzero"):   # an older torch: such a forward is refused
        return contextlib.nullcontext()
    return _config.patch(meta_nonzero_assume_all_nonzero=True)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as torch runs it on a CPU: on meta tensors torch always picks the math path,
    which saves the (heads x tokens x tokens) weights, while a run without attention dropout takes the flash
    kernel, which saves the output and a logsumexp per token. Without dropout this calls the CPU flash kernel's op,
    whose meta implementation and backward save what the run saves; with dropout, the math path, as the CPU does
    (a GPU's flash kernel would save less: the plan is then an upper bound there)."""
    if dropout_p > 0:
        return TORCH_ATTENTION(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:   # grouped-query attention: each key/value head serves
        groups = query.shape[-3] // key.shape[-3]          # `groups` query heads
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def torch_functions_as_a_run_sees_them(zero3_saves: Callable[[torch.Tensor], object] | None):
    """While the plan's forward runs: `fused_attention` stands in for torch.nn.functional.scaled_dot_product_attention
    (transformers looks it up at each forward), and torch.nn.functional.linear is torch's own (TORCH_LINEAR;
    a ZeRO-3 engine built earlier in this process may have replaced it, rayeff/train/first_order.py). Under ZeRO-3
    (`zero3_saves` given), linear is wrapped as DeepSpeed wraps it: every call that records a graph saves its
    input, frozen layers' too."""
    attention, linear = F.scaled_dot_product_attention, F.linear

    def zero3_linear(input, weight, bias=None):
        if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
            zero3_saves(input)
        return TORCH_LINEAR(input, weight, bias)

    F.scaled_dot_product_attention = fused_attention
    F.linear = TORCH_LINEAR if zero3_saves is None else zero3_linear
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.linear = attention, linear


@dataclass(frozen=True)
class MetaStep:
    saved_activation_bytes: int   # what autograd saves for backward; 0 without it
    forward_flops: int            # torch's FlopCounterMode on the forward and loss (a multiply-add is 2)
    backward_flops: int           # ... on the backward: only what the trained parameters need; 0 without it
    forward_ops: int              # operator calls of the forward and loss
    backward_ops: int             # ... of the backward


def meta_step(model: nn.Module, base: nn.Module, job: JobSpec, batch: int, backward: bool = True) -> MetaStep:
    """One forward and loss of `batch` full-length sequences, and its backward where `backward` (a first-order
    method), on meta tensors. Counts the bytes autograd saves, each tensor once (a view counts as its base),
    parameters excluded (they are counted as parameters), as rayeff/measure/memory.py counts them in a run; under
    ZeRO-3, DeepSpeed's linear saves the input of every linear call, frozen layers' too. And counts the floating-point
    operations of the forward and of the backward, as `rayeff calibrate` counts those it times."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}   # held, so that no id is reused and a base keeps its Python object

    def pack(t: torch.Tensor) -> torch.Tensor:
        whole = t._base if t._base is not None else t
        if id(t) not in params and id(whole) not in params:
            saved[id(whole)] = whole
        return t

    def without_mask(_module, args, kwargs):
        return args, {**kwargs, "attention_mask": None}

    length = job.training.max_seq_length
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(base, "uses_token_types", False):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    zero3_saves = pack if job.deepspeed.zero_stage == 3 else None
    hook = base.backbone.register_forward_pre_hook(without_mask, with_kwargs=True)
    try:
        with every_element_nonzero(), torch_functions_as_a_run_sees_them(zero3_saves), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.set_grad_enabled(backward):
            with count_work() as forward:
                loss = _loss(model(**inputs), ids, job, batch)
            backward_work = Work()
            if backward:
                with count_work() as backward_work:
                    loss.backward()
    finally:
        hook.remove()
    return MetaStep(saved_activation_bytes=sum(t.numel() * t.element_size() for t in saved.values()),
                    forward_flops=forward.flops, backward_flops=backward_work.flops, forward_ops=forward.ops,
                    backward_ops=backward_work.ops)


def _loss(logits: torch.Tensor, ids: torch.Tensor, job: JobSpec, batch: int) -> torch.Tensor:
    """The run's loss (rayeff/train/run_setup.py); for causal-LM, every next token learned."""
    task = task_of(job.data)
    if task.kind == "causal_lm":
        return token_losses(logits, ids).sum()
    if task.is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), torch.zeros(batch, device="meta"))
    return F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long, device="meta"))


def model_shapes(job: JobSpec, config, batch: int, dtype: torch.dtype = torch.float32) -> ModelShapes:
    """The shapes of the job's method model; its activations from a forward in `dtype` (a first-order run under
    DeepSpeed bf16/fp16 holds the whole module in that dtype)."""
    model, base = method_model_on_meta(job, config)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen_matrices = [p for p in params if not p.requires_grad and p.is_floating_point() and p.ndim >= 2]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    first_order = get_method(job.method.name).loop == "first_order"
    step = meta_step(model.to(dtype) if first_order else model, base, job, batch, backward=first_order)
    return ModelShapes(total_params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in trainable),
                       trainable_tensors=len(trainable), frozen_matrix_params=sum(p.numel() for p in frozen_matrices),
                       buffer_bytes=buffers, saved_activation_bytes=step.saved_activation_bytes,
                       forward_flops=step.forward_flops, backward_flops=step.backward_flops,
                       forward_ops=step.forward_ops, backward_ops=step.backward_ops)
