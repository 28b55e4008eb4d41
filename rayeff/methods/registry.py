"""What a fine-tuning method is: one `MethodDefinition`, registered by name.

A definition names everything rayeff needs of a method, in one place:

    config       the pydantic config, whose fields are the job file's `method:` section (base: MethodConfig)
    build        (model, config) -> the module to train: it calls like the model it is given (`model(**batch) ->
                 logits`) and marks what trains with `requires_grad`. The model is a SequenceClassifier or, for a
                 causal-LM task, a CausalLM (rayeff/models.py): both have `backbone`, `head`, `run_backbone`
    task_types   the data task types it trains (data.task_type): classification and regression unless it says more
    loop         the training loop that steps it: "first_order" (rayeff/train/first_order.py, backward + DeepSpeed)
                 or "zeroth_order" (rayeff/train/zeroth_order.py, SPSA from forward passes)
    check_job    optional: (config, job) -> None, raising ValueError when the rest of the job does not suit the method
    check_model  optional: (config, backbone built without weights) -> None, raising UserError when they clash
    figures      optional: (model) -> dict of the method's own figures, kept in result.json's `method_figures`
    routing      optional: (model) -> the Mixture-of-Experts layers whose routing is recorded and reported
    backward_through_backbone
                 whether the backward pass runs through the backbone (True; READ runs its backbone without
                 autograd, so its backward needs none of the backbone's weights, and rayeff/plan/planner.py counts
                 ZeRO-3's gathers of them for the forward only)

This module imports nothing of rayeff's but the spec base, so that configs, methods and loops can all import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from torch import nn

from rayeff.spec_base import Spec

LOOPS = ("first_order", "zeroth_order")
LABELLED_TASKS = ("classification", "regression")
EVERY_TASK_TYPE = (*LABELLED_TASKS, "causal_lm", "prompted_classification")


class MethodConfig(Spec):
    """Base of each method's own config; `name` picks the method."""

    name: str


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    config: type[MethodConfig]
    build: Callable[[nn.Module, Any], nn.Module]
    loop: Literal["first_order", "zeroth_order"]
    check_job: Callable[[Any, Any], None] | None = None
    check_model: Callable[[Any, nn.Module], None] | None = None
    figures: Callable[[nn.Module], dict] | None = None
    routing: Callable[[nn.Module], list] | None = None
    backward_through_backbone: bool = True
    task_types: tuple[str, ...] = LABELLED_TASKS

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"method {self.name}: loop {self.loop!r} is not one of {', '.join(LOOPS)}")


METHODS: dict[str, MethodDefinition] = {}


def register_method(definition: MethodDefinition) -> None:
    if definition.name in METHODS:
        raise ValueError(f"a method named {definition.name!r} is registered already; choose another name")
    METHODS[definition.name] = definition


def get_method(name: str) -> MethodDefinition:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_config_from_dict(raw: dict) -> MethodConfig:
    """The job's `method:` mapping as its method's own config; raises ValueError for pydantic to report."""
    name = raw.get("name")
    if name is None:
        raise ValueError("`name` is missing; choose one of " + ", ".join(sorted(METHODS)))
    return get_method(str(name)).config.model_validate(raw)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
