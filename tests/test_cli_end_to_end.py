"""`rayeff run` as a user runs it, in a subprocess that starts its own local Ray: the real MiniLM on 2 workers,
an output folder that refuses a second run without --resume, and a run interrupted (SIGINT), killed mid-way (SIGKILL)
and terminated (SIGTERM) that resumes each time, to the same final weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayeff.config import load_job
from rayeff.data.metrics import compute_metrics
from rayeff.data.task import task_of
from rayeff.data.tokenized import Collator, load_train_and_dev
from rayeff.models import build_classifier, load_tokenizer, resolve_model
from run_folder import checkpoint_steps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def rayeff(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "rayeff.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, **kwargs)


def untrained_and_majority_accuracy(job_file: Path, overrides: list[str]) -> tuple[float, float]:
    """On the job's dev set: the accuracy of its model before any update (READ's W_o starts at zero, so that is the
    backbone with the head the workers initialise, seeded alike) and of always answering the majority class."""
    job = load_job(job_file, overrides)
    source, task = resolve_model(job.model.name), task_of(job.data)
    torch.manual_seed(job.training.seed)   # as each worker does before it builds the model
    tokenizer = load_tokenizer(source)
    _, dev = load_train_and_dev(job.data, tokenizer, job.training.max_seq_length)
    classifier = build_classifier(source, task.num_labels, job.model.dropout, job.model.pooling,
                                  job.model.head).eval()
    collate = Collator(tokenizer.pad_token_id, job.training.max_seq_length, False, classifier.uses_token_types,
                       task.is_regression)
    with torch.no_grad():
        predictions = classifier(**collate([dict(dev[i], index=i) for i in range(len(dev))])).argmax(-1).tolist()
    labels = list(dev["label"])
    untrained = compute_metrics(task.metrics, predictions, labels)["accuracy"]
    return untrained, max(Counter(labels).values()) / len(labels)


def test_read_job_on_minilm_with_two_workers_beats_the_untrained_model(tmp_path, glue_dir):
    out, job_file = tmp_path / "read", ROOT / "jobs" / "sst2-read.yaml"
    overrides = ["data.train_subset=96", "data.eval_subset=64", "training.epochs=1"]
    run = subprocess.Popen([sys.executable, "-m", "rayeff.cli", "run", job_file, "--data-dir", glue_dir, "--output",
                            out, "--no-progress", *(a for o in overrides for a in ("--set", o))],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the baselines while the run starts up
    untrained, majority = untrained_and_majority_accuracy(job_file, [f"data.data_dir={glue_dir}", *overrides])
    _, stderr = run.communicate(timeout=900)
    assert run.returncode == 0, stderr[-3000:]
    # a healthy run shows no error-level line from the libraries underneath (Ray's C++ log lines read
    # "[date time E pid tid] file.cc:line: ...", Python's logging "ERROR")
    errors = [line for line in stderr.splitlines() if re.search(r"\d E \d+ \d+\]|\bERROR\b", line)]
    assert not errors, errors
    result = json.loads((out / "result.json").read_text())
    assert result["workers"] == 2 and result["method"] == "read" and result["model"] == "minilm-l6"
    assert result["time"]["steps"] == 3
    assert result["metrics"]["accuracy"] > max(untrained, majority), (result["metrics"], untrained, majority)
    assert result["memory"]["total_params"] > 22_000_000
    assert result["memory"]["trainable_params"] < 0.05 * result["memory"]["total_params"]

    again = rayeff("run", "jobs/sst2-read.yaml", "--data-dir", glue_dir, "--output", out, "--no-progress")
    assert again.returncode == 2
    assert "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1


SIGNAL_JOB = """
model: {name: tiny-bert}
data: {task: sst2, train_subset: 800, eval_subset: 16}
method: {name: full}
training: {max_steps: 100, batch_size: 8, lr: 1.0e-3, log_every: 5, checkpoint_every: 10}
scaling: {num_workers: 2}
deepspeed: {zero_stage: 1}
"""


def _signalled(job: Path, out: Path, how: signal.Signals, past_step: int,
               *options: str) -> subprocess.CompletedProcess:
    """`rayeff run` signalled once it has written a checkpoint past `past_step`: SIGINT (Ctrl-C in a terminal) and
    SIGKILL to its process group, SIGTERM to the process alone (a process manager)."""
    proc = subprocess.Popen([sys.executable, "-m", "rayeff.cli", "run", job, "--output", out, *options],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not any(s > past_step for s in checkpoint_steps(out)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if how == signal.SIGTERM:
        proc.send_signal(how)
    else:
        os.killpg(proc.pid, how)
    stdout, stderr = proc.communicate(timeout=600)
    if how == signal.SIGKILL:
        time.sleep(3)  # let Ray's own processes notice the driver is gone
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_a_run_interrupted_killed_and_terminated_resumes_each_time_to_the_uninterrupted_weights(tmp_path, glue_dir):
    """Full fine-tuning under ZeRO-1 on two workers, through `rayeff run` as a user runs it: Ctrl-C (SIGINT) ends
    the run after a whole step with a checkpoint at that step, status `stopped: interrupted` and exit 130; resumed,
    it is killed outright (SIGKILL, mid-way between checkpoints); resumed, it is stopped by SIGTERM as by Ctrl-C;
    resumed once more, it ends with the final weights and per-step losses of a run never interrupted."""
    job = tmp_path / "job.yaml"
    job.write_text(SIGNAL_JOB)
    common = ["--data-dir", str(glue_dir), "--no-progress"]
    straight = rayeff("run", job, "--output", tmp_path / "straight", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = json.loads((tmp_path / "straight" / "result.json").read_text())
    out = tmp_path / "run"

    def assert_interrupted(stopped: subprocess.CompletedProcess) -> int:
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert "stopping after the current step" in stopped.stderr and "interrupted at step" in stopped.stderr
        result = json.loads((out / "result.json").read_text())
        assert result["status"] == "stopped: interrupted" and 10 <= result["time"]["steps"] < 100
        assert checkpoint_steps(out)[-1] == result["time"]["steps"]   # its last checkpoint is at the stop
        assert result["step_losses"] == reference["step_losses"][:result["time"]["steps"]]
        return result["time"]["steps"]

    interrupted_at = assert_interrupted(_signalled(job, out, signal.SIGINT, 0, *common))
    killed = _signalled(job, out, signal.SIGKILL, interrupted_at, *common, "--resume")
    assert killed.returncode == -signal.SIGKILL
    killed_after = checkpoint_steps(out)[-1]
    assert interrupted_at < killed_after < 100
    assert json.loads((out / "result.json").read_text())["time"]["steps"] == interrupted_at   # not rewritten
    terminated_at = assert_interrupted(_signalled(job, out, signal.SIGTERM, killed_after, *common, "--resume"))
    assert terminated_at > killed_after

    resumed = rayeff("run", job, "--output", out, "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(out / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished" and result["time"]["steps"] == 100
    # resumed at the interrupt, at the last checkpoint Ray Train recorded before the kill, and at the terminate
    resumes = result["time"]["resumed_at_steps"]
    assert resumes[0] == interrupted_at and interrupted_at <= resumes[1] <= killed_after and resumes[2] == terminated_at
    assert result["step_losses"] == reference["step_losses"]
