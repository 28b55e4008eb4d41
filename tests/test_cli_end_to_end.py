"""`rayeff run` as a user runs it, in a subprocess that starts its own local Ray: the real MiniLM on 2 workers,
an output folder that refuses a second run without --resume, a run killed mid-way (SIGKILL) and runs interrupted
(SIGINT, SIGTERM) that resume to the same final weights as an uninterrupted one."""

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

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


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


KILL_JOB = """
model: {name: tiny-bert}
data: {task: sst2, train_subset: 800, eval_subset: 16}
method: {name: full}
training: {max_steps: 100, batch_size: 8, lr: 1.0e-3, log_every: 5, checkpoint_every: 10}
scaling: {num_workers: 2}
deepspeed: {zero_stage: 1}
"""


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "train").glob("step_*") if (p / "train_state.json").is_file())


def test_run_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path, glue_dir):
    job = tmp_path / "job.yaml"
    job.write_text(KILL_JOB)
    common = ["--data-dir", glue_dir, "--no-progress"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rayeff.cli", "run", job, "--output", killed, *common],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not _checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # let Ray's own processes notice the driver is gone
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    steps_done = json.loads((_checkpoints(killed)[-1] / "train_state.json").read_text())["step"]
    assert 10 <= steps_done < 100

    resumed = rayeff("run", job, "--output", killed, "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = rayeff("run", job, "--output", tmp_path / "straight", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]

    a = load_file(str(killed / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    res_a = json.loads((killed / "result.json").read_text())
    res_b = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert res_a["step_losses"] == res_b["step_losses"] and res_a["time"]["steps"] == 100


INTERRUPT_JOB = """
model: {name: tiny-llama}
data: {train_file: %s, dev_fraction: 0.1, task_type: causal_lm, template: "Q: {question}\\nA: ",
       columns: {response: answer}}
method: {name: adazeta, q_max: 2, q_target: 2, bottleneck: 8, tt_rank: 2}
training: {max_steps: 120, batch_size: 8, lr: 1.0e-3, log_every: 10, checkpoint_every: 20, max_seq_length: 32}
scaling: {num_workers: 2}
""" % (ROOT / "jobs" / "data" / "sums.jsonl")


def _interrupted(job: Path, out: Path, how: str) -> subprocess.CompletedProcess:
    """`rayeff run` signalled once its first checkpoint is written: SIGINT to its process group (Ctrl-C in a
    terminal) or SIGTERM to the process alone (a process manager)."""
    proc = subprocess.Popen([sys.executable, "-m", "rayeff.cli", "run", job, "--output", out, "--no-progress"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not _checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if how == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sigint_and_sigterm_stop_after_a_step_with_a_checkpoint_and_resume_to_the_uninterrupted_weights(tmp_path):
    """Two AdaZeta workers (1 vs N workers is bit-exact, so the uninterrupted reference runs in process): each
    signal ends the run after a whole step, status `stopped: interrupted`, exit 130, its last checkpoint at that
    step; resumed, the run's final weights are those of a run never interrupted."""
    from rayeff.train.runner import run_in_process

    job = tmp_path / "job.yaml"
    job.write_text(INTERRUPT_JOB)
    straight = run_in_process(load_job(job, [f"output_dir={tmp_path / 'straight'}", "scaling.num_workers=1"]))
    for how in ("SIGINT", "SIGTERM"):
        out = tmp_path / how
        stopped = _interrupted(job, out, how)
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert "stopping after the current step" in stopped.stderr and "interrupted at step" in stopped.stderr
        result = json.loads((out / "result.json").read_text())
        assert result["status"] == "stopped: interrupted" and 20 <= result["time"]["steps"] < 120
        last = json.loads((_checkpoints(out)[-1] / "train_state.json").read_text())["step"]
        assert last == result["time"]["steps"]
        assert result["step_losses"] == straight["step_losses"][:last]
    resumed = rayeff("run", job, "--output", tmp_path / "SIGINT", "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "SIGINT" / "final" / "trainable.safetensors"))
    b = load_file(straight["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
