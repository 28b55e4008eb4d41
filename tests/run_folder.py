"""What the tests read from a run folder while the run still writes it."""

from __future__ import annotations

import json
from pathlib import Path


def checkpoint_steps(run_folder: Path) -> list[int]:
    """The steps of the checkpoints in `run_folder/train`, in order. A checkpoint whose `train_state.json` is still
    empty or partial is left out: Ray Train copies a reported checkpoint into the folder file by file, and a test that
    polls the folder reads some mid-copy (it failed one run of the CLI's kill-and-resume test)."""
    steps = []
    for state in (run_folder / "train").glob("step_*/train_state.json"):
        try:
            steps.append(json.loads(state.read_text())["step"])
        except (json.JSONDecodeError, FileNotFoundError):
            continue
    return sorted(steps)
