"""Supervised fine-tuning of decoders on prompt/response data (data.task_type: causal_lm): the prompt's tokens are
never learned, the loss falls for full and LoRA on tiny-llama and tiny-gpt2, dev is scored by loss and perplexity,
a run goes through `rayeff run` on two Ray workers, and what cannot work is a one-line error before Ray starts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayeff.cli import main
from rayeff.config import DataSpec, validate_job
from rayeff.data.task import load_examples
from rayeff.data.tokenized import IGNORE_INDEX, Collator, tokenized_split
from rayeff.models import load_tokenizer, resolve_model
from rayeff.train.run_setup import token_losses
from rayeff.train.runner import run_in_process

ROOT = Path(__file__).resolve().parents[1]
SUMS = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]


@pytest.fixture
def sums(tmp_path) -> Path:
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SUMS))
    return path


def lm_data(path: Path, **fields) -> dict:
    return {"train_file": str(path), "dev_fraction": 0.25, "task_type": "causal_lm",
            "template": "Q: {question}\nA: ", "columns": {"response": "answer"}, **fields}


def test_the_template_builds_each_prompt_from_its_columns(sums):
    examples = load_examples(DataSpec(**lm_data(sums, dev_fraction=None, dev_file=str(sums))), "dev")
    assert examples["prompt"][7] == "Q: What is 1 plus 1?\nA: " and examples["response"][7] == "2"


def test_only_the_response_is_learned_whatever_the_prompt(tmp_path):
    """Two examples whose prompts differ (same length) and whose responses agree: the labels mask every prompt
    position, so for the same logits the loss and its gradient with respect to the logits are the same, and that
    gradient is zero at each position that would predict a prompt token."""
    rows = [{"prompt": "the cat sat on", "response": "the mat"}, {"prompt": "a dog ran to", "response": "the mat"}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(train_file=str(path), dev_file=str(path), task_type="causal_lm")
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    data = tokenized_split(spec, "train", tokenizer, 32)
    a, b = data[0], data[1]
    prompt_len = len(tokenizer("the cat sat on", add_special_tokens=False)["input_ids"])
    assert len(a["input_ids"]) == len(b["input_ids"]) and a["input_ids"][:prompt_len] != b["input_ids"][:prompt_len]
    assert a["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert a["labels"][prompt_len:] == a["input_ids"][prompt_len:] == b["labels"][prompt_len:]
    assert a["labels"][-1] == tokenizer.sep_token_id   # the end of the response is learned too

    collate = Collator(tokenizer.pad_token_id, 32, False, False, False)
    torch.manual_seed(0)
    logits = torch.randn(1, len(a["input_ids"]), len(tokenizer))
    grads = []
    for example in (a, b):
        x = logits.clone().requires_grad_(True)
        labels = collate([dict(example, index=0)])["labels"]
        loss = token_losses(x, labels).sum()
        loss.backward()
        grads.append((loss.item(), x.grad))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])
    g = grads[0][1][0]
    assert torch.count_nonzero(g[:prompt_len - 1]) == 0 and torch.count_nonzero(g[-1]) == 0   # predicting prompt
    assert all(torch.count_nonzero(g[t]) > 0 for t in range(prompt_len - 1, len(a["input_ids"]) - 1))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_lower_the_response_loss_on_decoders(tmp_path, sums, model, method):
    result = run_in_process(validate_job({
        "model": {"name": model}, "method": {"name": method}, "output_dir": str(tmp_path / "out"),
        "data": lm_data(sums, train_subset=8),   # one batch, every step: its loss must fall
        "training": {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "log_every": 4}}))
    losses = result["loss_history"]
    assert losses[-1] < losses[0] - (0.5 if method == "full" else 0.02), losses
    assert set(result["metrics"]) == {"eval_loss", "perplexity"}
    assert result["metrics"]["perplexity"] == pytest.approx(math.exp(result["metrics"]["eval_loss"]), rel=1e-12)
    uniform = math.log(30522)   # the loss of a uniform guess over the vocabulary, where random weights start
    if method == "full":   # it learned what answers look like, not only the 8 examples it saw
        assert result["metrics"]["eval_loss"] < uniform - 1
    memory = result["memory"]
    if method == "lora":   # the pretrained LM head (tied to the embeddings in GPT-2) stays frozen
        assert memory["trainable_params"] < 0.01 * memory["total_params"]
    else:
        assert memory["trainable_params"] == memory["total_params"]


@pytest.mark.slow
def test_rayeff_run_fine_tunes_a_decoder_on_two_workers(tmp_path):
    """The shipped example job (tiny-llama, LoRA, its sums file) through the command line on a local Ray."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "rayeff.cli", "run", "jobs/sums-causal-lm.yaml", "--output",
                           str(out), "--no-progress", "--set", "training.epochs=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["workers"] == 2 and result["task"] == "sums" and result["method"] == "lora"
    assert result["time"]["steps"] == math.ceil(90 / 8)   # 100 examples, 10 held out
    assert set(result["metrics"]) == {"eval_loss", "perplexity"} and result["status"] == "finished"
    assert result["loss_history"][-1] < result["loss_history"][0]


@pytest.mark.parametrize("change,needle", [
    ({"method": {"name": "read"}}, "method read cannot train a causal_lm task (data.task_type) yet"),
    ({"method": {"name": "adazeta"}}, "method adazeta cannot train a causal_lm task"),
    ({"data": {"template": "Q: {query}\nA: "}}, "data.template names 'query', which data.train_file"),
    ({"data": {"template": "Q: {}"}}, "data.template: {} is not a column name"),
    ({"data": {"template": None, "columns": {"response": "answer"}}}, "data.columns.prompt: data.train_file"),
    ({"data": {"k_shot": 2}}, "k_shot draws k examples per class"),
    ({"data": {"task_type": "regression"}}, "template builds a causal_lm prompt"),
    ({"model": {"name": "tiny-bert"}}, "a causal-LM task needs a decoder-only model; bert is an encoder"),
])
def test_what_cannot_work_is_one_line_exit_2_before_ray(tmp_path, sums, capsys, ray_calls, change, needle):
    job = {"model": {"name": "tiny-llama"}, "method": {"name": "full"}, "data": lm_data(sums),
           "training": {"max_steps": 2, "batch_size": 4}}
    for section, fields in change.items():
        job[section] = {**job[section], **fields} if section == "data" else fields
    job["data"] = {k: v for k, v in job["data"].items() if v is not None}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    code = main(["run", str(path), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert not ray_calls and code == 2 and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists()
