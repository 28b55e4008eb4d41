"""Batch inference over a JSON-lines file of any size, through Ray Data:

    rayeff predict RUN_OR_EXPORT --input FILE --output FILE [--workers N]

RUN_OR_EXPORT is a finished run's folder (its model is rebuilt from the job and its trained tensors) or a folder
`rayeff export` wrote. Each output line is the input line's object plus a `prediction`: the label (classification),
the number (regression), or the greedy continuation of the prompt (causal LM; the prompt built as in training, from
the prompt column, the template, or the chat `messages`). Lines keep their order. The file is read in blocks and
predicted by a pool of actors, one model each (as many as the job's workers, or --workers), and written to a
temporary name renamed at the end, so an interrupted run leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rayeff.errors import UserError


@dataclass
class InferenceModel:
    """What predicting needs, loaded once per actor."""
    job: object
    task: object
    model: nn.Module     # model(input_ids, attention_mask[, token_type_ids]) -> logits
    tokenizer: object
    positions: int | None   # the most tokens the model reads (None: no learned position table)
    scoring: str | None     # a prompted task's scored position (data/tokenized.py prompt_scoring)


def load_for_inference(source: Path) -> InferenceModel:
    """The trained model of a run's folder or an export (rayeff.load), on this process's GPU when it has one."""
    from rayeff.export import load_trained

    trained = load_trained(source)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    tokenizer = trained.tokenizer
    tokenizer.padding_side = "right"   # the classifier reads the last real token where padding follows it
    return InferenceModel(trained.job, trained.task, trained.model.to(device), tokenizer,
                          model_positions(source, trained.job), trained.scoring)


def model_positions(source: Path, job) -> int | None:
    from rayeff.export import export_form_of
    from rayeff.models import ModelSource, resolve_model
    from rayeff.train.preflight import max_positions

    if export_form_of(source) in ("language_model", "sequence_classifier"):   # the folder is the model
        return max_positions(ModelSource(job.model.name, str(source), str(source)))
    return max_positions(resolve_model(job.model.name))


def predict_records(loaded: InferenceModel, records: list[dict], max_new_tokens: int, sampling=None) -> list:
    """The prediction for each record, in order; a causal LM's greedy, or with `sampling` (rayeff.generation.Sampling)
    sampled, continuation."""
    if loaded.task.kind == "causal_lm":
        return _generate(loaded, records, max_new_tokens, sampling)
    job, task, tokenizer = loaded.job, loaded.task, loaded.tokenizer
    if task.kind == "prompted":
        batch = _prompted_batch(loaded, records)
    else:
        columns = job.data.columns
        texts = [r[columns.get("text", "text")] for r in records]
        pairs = [r[columns.get("text_pair", "text_pair")] for r in records] if task.text_fields == 2 else None
        batch = tokenizer(texts, pairs, truncation=True, max_length=job.training.max_seq_length, padding=True,
                          return_tensors="pt")
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        logits = loaded.model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
    if task.is_regression:
        return logits.squeeze(-1).tolist()
    return [task.labels[i] for i in logits.argmax(-1).tolist()]


def _prompted_batch(loaded: InferenceModel, records: list[dict]) -> dict:
    """The records' prompts as training tokenised them, right-padded."""
    from rayeff.data.task import prompted_record
    from rayeff.data.tokenized import Collator, prompt_ids

    job, scoring = loaded.job, loaded.scoring
    examples = [{"input_ids": prompt_ids(prompted_record(loaded.task, job.data, r), loaded.tokenizer,
                                         job.training.max_seq_length, scoring), "label": 0, "index": i}
                for i, r in enumerate(records)]
    batch = Collator(loaded.tokenizer.pad_token_id, job.training.max_seq_length, False, False, False)(examples)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def generation_prompt(loaded: InferenceModel, record: dict) -> list[int]:
    """A record's prompt tokens, as training built them (rayeff/data/tokenized.py)."""
    from rayeff.data.tokenized import render_chat, start_tokens

    data, tokenizer = loaded.job.data, loaded.tokenizer
    messages = record.get(data.columns.get("messages", "messages"))
    if isinstance(messages, list):
        if messages and messages[-1].get("role") == "assistant":   # the reply to predict
            messages = messages[:-1]
        text = render_chat(tokenizer, data.chat_template, messages, generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = data.template.format_map(record) if data.template else record[data.columns.get("prompt", "prompt")]
    return start_tokens(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _generate(loaded: InferenceModel, records: list[dict], max_new_tokens: int, sampling) -> list[str]:
    from rayeff.data.tokenized import end_token, start_tokens
    from rayeff.generation import generate

    # a prompt longer than training's max_seq_length (or than the model's positions leave beside what it
    # generates) keeps its start tokens and its end, as training kept it
    room = loaded.job.training.max_seq_length
    if loaded.positions is not None:
        room = min(room, loaded.positions - max_new_tokens)
    start, prompts = len(start_tokens(loaded.tokenizer)), []
    for record in records:
        ids = generation_prompt(loaded, record)
        prompts.append(ids if len(ids) <= room else ids[:start] + ids[len(ids) - (room - start):])
    new = generate(loaded.model, prompts, loaded.tokenizer.pad_token_id, end_token(loaded.tokenizer), max_new_tokens,
                   sampling=sampling)
    return [loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]


class Predictor:
    """One Ray Data actor: loads the model once, then turns blocks of input lines into output lines."""

    def __init__(self, source: str, max_new_tokens: int, sampling):
        from rayeff.quiet import quiet_libraries

        quiet_libraries()
        self.loaded = load_for_inference(Path(source))
        self.max_new_tokens, self.sampling = max_new_tokens, sampling

    def __call__(self, batch: dict) -> dict:
        records = [json.loads(line) for line in batch["text"]]
        predictions = predict_records(self.loaded, records, self.max_new_tokens, self.sampling)
        return {"line": [json.dumps({**r, "prediction": p}, ensure_ascii=False)
                         for r, p in zip(records, predictions)]}


def check_input(path: Path, job, task) -> int:
    """Every non-blank line a JSON object holding what the job's examples need; returns how many lines there are.
    Read once through, before Ray starts (a bad line found by an actor would end the job half-way)."""
    if not path.is_file():
        raise UserError(f"--input: {path} not found; give a JSON-lines file (one object per line)")
    from rayeff.data.task import input_columns

    needed = input_columns(job.data, task)
    lines = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                raise UserError(f"--input: {path} line {number} is blank; every line must be one JSON object")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"--input: {path} line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"--input: {path} line {number}: not a JSON object")
            if not any(all(c in record for c in option) for option in needed):
                wanted = " or ".join("+".join(option) for option in needed)
                raise UserError(f"--input: {path} line {number} has none of the columns the model reads ({wanted})")
            lines += 1
    if not lines:
        raise UserError(f"--input: {path} holds no lines")
    return lines


def predict_file(source: str, input_path: str, output_path: str, workers: int | None = None,
                 batch_size: int = 64, max_new_tokens: int = 32, address: str | None = None, sampling=None) -> dict:
    from rayeff.cluster.connect import init_ray

    src, inp, out = Path(source).resolve(), Path(input_path).resolve(), Path(output_path).resolve()
    if not src.is_dir():
        raise UserError(f"RUN_OR_EXPORT: {source} is not a folder; give a run's folder or an export")
    from rayeff.export import trained_job_and_task

    job, task = trained_job_and_task(src)
    lines = check_input(inp, job, task)
    if out.exists():
        raise UserError(f"--output: {out} already exists; choose another file")
    if not out.parent.is_dir():
        raise UserError(f"--output: {out.parent} is not a folder; create it first")
    positions = model_positions(src, job) if job.data.task_type == "causal_lm" else None
    if positions is not None and max_new_tokens >= positions:
        raise UserError(f"--max-new-tokens: {max_new_tokens} leaves no room for a prompt in the model's {positions} "
                        "positions; lower it")
    workers = workers or job.scaling.num_workers
    init_ray(address, workers + 1)   # one CPU beyond the model actors, for Ray Data's tasks that read the file
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    gpus = 1 if job.scaling.gpus_per_worker > 0 else 0
    predicted = ray.data.read_text(str(inp)).map_batches(
        Predictor, fn_constructor_kwargs={"source": str(src), "max_new_tokens": max_new_tokens,
                                          "sampling": sampling},
        batch_size=batch_size, concurrency=workers, num_cpus=1, num_gpus=gpus)
    start, written = time.perf_counter(), 0
    partial = out.with_name(out.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for batch in predicted.iter_batches(batch_size=None, batch_format="numpy"):
            for line in batch["line"]:
                f.write(str(line) + "\n")
            written += len(batch["line"])
    seconds = time.perf_counter() - start
    if written != lines:
        raise RuntimeError(f"{lines} input lines but {written} predictions; the partial output is {partial}")
    os.replace(partial, out)
    return {"lines": written, "seconds": seconds, "lines_per_second": written / seconds, "workers": workers}
