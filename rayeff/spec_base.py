"""The base of every validated spec (jobs, methods, sweeps): pydantic models that refuse unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Base of every spec: unknown fields are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def no_nul(value: str | None) -> str | None:
    """A path (or name) that the OS can take: no NUL character, not empty."""
    if value is not None and ("\x00" in value or not value.strip()):
        raise ValueError("must be a non-empty path without NUL characters")
    return value
