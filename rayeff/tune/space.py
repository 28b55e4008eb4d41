"""Search spaces: which job fields a sweep tunes and over what, read from a YAML file in `search_spaces/`.

    method: read                  # the method whose fields these are; a sweep's base job must use it
    params:
      training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      method.hidden_size: {type: int, low: 16, high: 256, log: true}
      method.rnn: {type: categorical, choices: [gru, lstm]}

Every key is a dotted job field (as `--set` takes them). Loading checks each one against a job of the named method:
the bounds and every choice must make a valid job, so a typo or an out-of-range bound is one line naming the file
and the field, before any trial runs. `optuna_distributions` gives the space to Optuna's samplers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from rayeff.config import describe_errors, read_yaml_mapping, set_field, validate_job
from rayeff.errors import UserError
from rayeff.spec_base import Spec


class ParamSpec(Spec):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample on a log scale (float and int)")
    step: float | None = Field(None, gt=0, description="grid step (float and int, not with log)")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None:
                raise ValueError("categorical takes `choices`, not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"the range is empty: low ({self.low}) must be below high ({self.high}); to fix a "
                             "value, set it in the sweep's overrides instead")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("set log or step, not both")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("int bounds and step must be whole numbers")
        return self

    def corner_values(self) -> list[Any]:
        """Values that span the range: its ends, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]


class SearchSpace(Spec):
    method: str = Field(description="the method these fields belong to")
    params: dict[str, ParamSpec] = Field(min_length=1)


def check_fields(space: SearchSpace, source: str, base: dict | None = None) -> None:
    """Every tuned field, at each end of its range (or each choice), must give a valid job of `space.method`:
    a minimal one, or `base` (a job dump) when given, since a valid space can still clash with a valid job
    (AdaZeta's beta with a job that sets q_target)."""
    for key, param in space.params.items():
        for value in param.corner_values():
            raw: dict = copy.deepcopy(base) if base else {"data": {"task": "sst2"}, "method": {"name": space.method}}
            set_field(raw, key, value)
            try:
                validate_job(raw, source)
            except UserError as err:
                raise UserError(f"{source}: params.{key} = {value!r} does not make a valid {space.method} job "
                                f"({str(err).removeprefix(source + ': ')})") from None


def load_search_space(path: str | Path, check: bool = True) -> SearchSpace:
    """The space in `path`; with `check`, each field checked against a minimal job of its method (a sweep checks
    them against its base job instead: a field may need what the base job sets, e.g. READ's attention pooling
    a mean-pooled model)."""
    raw = read_yaml_mapping(path, "search-space", "`method` and `params` (see search_spaces/)")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{path}: {describe_errors(err)}") from None
    if check:
        check_fields(space, str(path))
    return space


def optuna_distributions(space: SearchSpace) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in space.params.items():
        if p.type == "categorical":
            out[key] = CategoricalDistribution(p.choices)
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out
