"""Fine-tuning methods: one module each, registered here by name.

A method is a pydantic config (its fields are the job file's `method:` section) and a `build` function that turns a
`SequenceClassifier` into the module to train: it calls like the classifier (`model(**batch) -> logits`) and marks
what trains with `requires_grad`. The config's `training_loop` names the loop that steps it (rayeff/train). To add a
method, write `rayeff/methods/<name>.py` with both and call `register_method` at its end; import it below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from rayeff.config import MethodConfig


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    config_cls: type[MethodConfig]
    build: Callable[..., nn.Module]    # (classifier: SequenceClassifier, config) -> model to train
    check: Callable[..., None] | None = None   # (config, backbone built without weights): UserError if they clash


METHODS: dict[str, MethodDefinition] = {}


def register_method(definition: MethodDefinition) -> None:
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
    return get_method(str(name)).config_cls.model_validate(raw)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


from rayeff.methods import adazeta, full, lora, mezo, moe, read  # noqa: E402,F401  (registration)
