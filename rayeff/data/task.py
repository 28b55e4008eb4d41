"""What a run learns, and its examples, whether they come from a GLUE preset or from your own files
(rayeff/data/files.py):

    task = task_of(job.data)                    # a LabelledTask (classification, regression), a PromptedTask
                                                # (prompted_classification) or a CausalLMTask
    examples = load_examples(job.data, "dev")   # {"text_a": [...], "text_b": [...] or None, "label": [...]}
                                                # or, prompted: {"prompt": [...], "label": [...]}
                                                # or, causal_lm: {"prompt": [...], "response": [...]}
                                                # or {"messages": [[{role, content}, ...], ...]} (chat)

Labels come out as class indices in the order of `task.labels` (the model's outputs), or as floats for regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rayeff.config import DataSpec
from rayeff.data import files, glue
from rayeff.errors import UserError

LOWER_IS_BETTER = ("eval_loss", "perplexity")   # a causal LM's dev metrics; every other dev metric is higher-better


@dataclass(frozen=True)
class LabelledTask:
    """Classify a text (or a pair) into a label set, or score it (regression: `labels` None)."""
    kind = "labelled"
    name: str
    labels: tuple[str, ...] | None   # None: regression
    metrics: tuple[str, ...]         # the first is the one runs are compared on
    text_fields: int                 # 1 (text) or 2 (text and text_pair)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


@dataclass(frozen=True)
class PromptedTask(LabelledTask):
    """Classify by prompting: the template turns an example into a prompt, and each label is scored by the LM head's
    logits of its label words where the template's {mask} is (the next token, for a decoder). The model's outputs
    are then class logits, so loss, metrics and predictions are a classifier's."""
    kind = "prompted"
    template: str = ""
    label_words: tuple[tuple[str, ...], ...] = ()   # per label, in the order of `labels`


MASK_FIELD = "mask"          # the template's {mask}: where the label word goes
MASK_SENTINEL = "\ue000"     # {mask} in a filled prompt, until tokenisation puts the model's own token there


@dataclass(frozen=True)
class CausalLMTask:
    """Write the response to a prompt: next-token cross-entropy on the response tokens only, scored on dev by that
    loss (lower is better) and its perplexity."""
    name: str
    template: str | None
    metrics: tuple[str, ...] = ("eval_loss", "perplexity")
    is_regression = False
    kind = "causal_lm"
    text_fields = 2   # prompt and response
    num_labels = 0


OWN_METRICS = {"classification": ("accuracy", "macro_f1"), "regression": ("pearson", "spearmanr")}


def task_record(task) -> dict:
    """A task as plain data (an export keeps it, so loading the model needs neither the data nor the hub)."""
    from dataclasses import asdict

    return {"kind": task.kind, **asdict(task)}


def task_from_record(record: dict) -> LabelledTask | PromptedTask | CausalLMTask:
    kind, fields = record["kind"], {k: v for k, v in record.items() if k != "kind"}
    if kind == "causal_lm":
        return CausalLMTask(fields["name"], fields["template"], tuple(fields["metrics"]))
    common = (fields["name"], None if fields["labels"] is None else tuple(fields["labels"]), tuple(fields["metrics"]),
              fields["text_fields"])
    if kind == "prompted":
        return PromptedTask(*common, fields["template"], tuple(tuple(w) for w in fields["label_words"]))
    return LabelledTask(*common)


def task_of(spec: DataSpec) -> LabelledTask | PromptedTask | CausalLMTask:
    if spec.task_type == "causal_lm":
        return CausalLMTask(spec.display_name, spec.template)
    if not spec.own:
        preset = glue.get_task(spec.task)
        task = LabelledTask(preset.name, preset.labels, preset.metrics, len(preset.text_columns))
        return _prompted(task, spec) if spec.task_type == "prompted_classification" else task
    table, field, path = _split_source(spec, "train")
    pair = spec.columns.get("text_pair", "text_pair")
    text_fields = 2 if "text_pair" in spec.columns or pair in table else 1
    if spec.task_type == "regression":
        return LabelledTask(spec.display_name, None, OWN_METRICS["regression"], text_fields)
    labels = tuple(spec.labels) if spec.labels else _label_set(_column(table, spec, "label", field, path))
    if len(labels) < 2:
        raise UserError(f"{field}: {path} has one label ({labels[0]!r}) only; a classifier needs examples of at "
                        "least two")
    task = LabelledTask(spec.display_name, labels, OWN_METRICS["classification"], text_fields)
    return _prompted(task, spec) if spec.task_type == "prompted_classification" else task


def _prompted(task: LabelledTask, spec: DataSpec) -> PromptedTask:
    """The task with its template and each label's words, checked against its label set."""
    if task.is_regression:
        raise UserError(f"data.task_type: {task.name} is a regression task; prompted_classification scores labels "
                        "by their words, so it needs classes")
    words = {_label_name(k): v for k, v in spec.label_words.items()}
    missing, unknown = [n for n in task.labels if n not in words], [n for n in words if n not in task.labels]
    if missing or unknown:
        fix = (f"label {missing[0]!r} has no word" if missing else f"{unknown[0]!r} is not a label")
        raise UserError(f"data.label_words: {fix}; give one word (or a list) for each of the labels "
                        f"[{', '.join(task.labels)}]")
    per_label = tuple(tuple([words[n]] if isinstance(words[n], str) else words[n]) for n in task.labels)
    if any(not w or any(not x.strip() for x in w) for w in per_label):
        raise UserError("data.label_words: a label's word is empty; give each label a word")
    import string

    if [f for _, f, _, _ in string.Formatter().parse(spec.template)].count(MASK_FIELD) > 1:
        raise UserError("data.template: {mask} appears more than once; the label word goes in one place")
    template_fields(spec.template)   # a malformed template is a one-line error here
    return PromptedTask(task.name, task.labels, task.metrics, task.text_fields, spec.template, per_label)

def load_examples(spec: DataSpec, split: str) -> dict:
    """The columns of one split ("train" or "dev"): GLUE's from its folder or the hub, yours from your files."""
    task = task_of(spec)
    if not spec.own:
        examples = glue.load_split(spec.task, split, spec.data_dir)
        if task.kind == "prompted":
            prompts = _filled_prompts(task, _preset_columns(spec, examples), len(examples["label"]), "data.task",
                                      spec.task)
            return {"prompt": prompts, "label": examples["label"]}
        return examples
    build = {"causal_lm": _prompts_and_responses, "prompted": _prompted_examples}.get(task.kind, _examples)
    if spec.dev_fraction is None:
        table, field, path = _split_source(spec, split)
        return build(table, spec, task, field, path)
    table, field, path = _split_source(spec, "train")
    examples = build(table, spec, task, field, path)
    keep = _held_out(len(next(iter(examples.values()))), spec, split)
    return {name: None if values is None else [values[i] for i in keep] for name, values in examples.items()}


def _split_source(spec: DataSpec, split: str) -> tuple[dict[str, list], str, str]:
    """(the columns of your data's `split`, before any held-out draw; the job field that names them; their name in
    messages): a file (train_file, dev_file) or a split of a dataset (dataset with train_split, dev_split)."""
    if spec.dataset is not None:
        name = spec.train_split if split == "train" or spec.dev_fraction is not None else spec.dev_split
        field = "data.train_split" if name == spec.train_split else "data.dev_split"
        return (files.read_dataset_split(spec.dataset, spec.dataset_config, name, field), "data.dataset",
                f"{spec.dataset}[{name}]")
    if split == "train" or spec.dev_fraction is not None:
        return files.read_table(spec.train_file, "data.train_file"), "data.train_file", spec.train_file
    return files.read_table(spec.dev_file, "data.dev_file"), "data.dev_file", spec.dev_file


def _held_out(n: int, spec: DataSpec, split: str) -> np.ndarray:
    """The examples of `split` when data.dev_fraction of the train file is dev: a seeded draw, in the file's order."""
    n_dev = max(1, round(spec.dev_fraction * n))
    if n_dev >= n:
        raise UserError(f"data.dev_fraction: {spec.dev_fraction:g} of {_split_source(spec, 'train')[2]}'s {n} "
                        "examples leaves none to train on; lower it or give a dev_file or dev_split")
    order = np.random.default_rng(spec.seed).permutation(n)
    return np.sort(order[:n_dev] if split == "dev" else order[n_dev:])


def _column(table: dict[str, list], spec: DataSpec, role: str, field: str, path: str) -> list:
    name = spec.columns.get(role, role)
    if name not in table:
        raise UserError(f"data.columns.{role}: {field} {path} has no column {name!r} (its columns: "
                        f"{', '.join(map(str, table)) or 'none'}); set data.columns.{role} to the column that holds "
                        f"the {role}")
    return table[name]


def _label_name(value) -> str | None:
    """A label as the label set names it: JSON's 1 and a CSV's "1" are the same class."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text   # a CSV's "True" is JSON's true


def _label_set(values: list) -> tuple[str, ...]:
    names = {n for n in map(_label_name, values) if n}
    if all(n.lstrip("-").isdigit() for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def _examples(table: dict[str, list], spec: DataSpec, task: LabelledTask, field: str, path: str) -> dict:
    text = _texts(_column(table, spec, "text", field, path), "text", field, path)
    pair = None
    if task.text_fields == 2:
        pair = _texts(_column(table, spec, "text_pair", field, path), "text_pair", field, path)
    raw = _column(table, spec, "label", field, path)
    return {"text_a": text, "text_b": pair, "label": _labels(raw, task, field, path)}


def _preset_columns(spec: DataSpec, examples: dict) -> dict[str, list]:
    """A GLUE split's texts under the names a template may use: text and text_pair, and the preset's own column
    names (sentence, question1, ...)."""
    preset = glue.get_task(spec.task)
    texts = [examples["text_a"]] + ([examples["text_b"]] if examples["text_b"] is not None else [])
    columns = {"text": texts[0]} | ({"text_pair": texts[1]} if len(texts) > 1 else {})
    for names in (preset.text_columns, preset.hub_text_columns):
        columns |= dict(zip(names, texts))
    return columns


def _prompted_examples(table: dict[str, list], spec: DataSpec, task: PromptedTask, field: str, path: str) -> dict:
    """Each example's filled template and label."""
    labels = _labels(_column(table, spec, "label", field, path), task, field, path)
    return {"prompt": _filled_prompts(task, _with_roles(table, spec), len(labels), field, path), "label": labels}


def _with_roles(table: dict[str, list], spec: DataSpec) -> dict[str, list]:
    """The columns, plus text and text_pair for the columns they map (a template may name either)."""
    columns = dict(table)
    for role in ("text", "text_pair"):
        if spec.columns.get(role, role) in table:
            columns[role] = table[spec.columns.get(role, role)]
    return columns


def _filled_prompts(task: PromptedTask, columns: dict[str, list], n: int, field: str, path: str) -> list[str]:
    names = [name for name in template_fields(task.template) if name != MASK_FIELD]
    missing = [name for name in names if name not in columns]
    if missing:
        raise UserError(f"data.template names {', '.join(map(repr, missing))}, which {field} {path} lacks (its "
                        f"columns: {', '.join(map(str, columns))}); use its columns' names in braces")
    values = {name: _texts(columns[name], name, field, path) for name in names}
    return [task.template.format_map({name: values[name][i] for name in names} | {MASK_FIELD: MASK_SENTINEL})
            for i in range(n)]


def prompted_record(task: PromptedTask, spec: DataSpec, record: dict) -> str:
    """One record's filled template, as training fills it (predict's input lines)."""
    return _filled_prompts(task, _with_roles({k: [v] for k, v in record.items()}, spec), 1, "--input", "line")[0]


def input_columns(spec: DataSpec, task) -> list[tuple[str, ...]]:
    """The alternative sets of columns one record must hold for the model to read it (labels and responses aside)."""
    columns = spec.columns
    if spec.task_type == "causal_lm":
        messages = (columns.get("messages", "messages"),)
        if spec.template:
            return [tuple(template_fields(spec.template)), messages]
        return [(columns.get("prompt", "prompt"),), messages]
    if spec.task_type == "prompted_classification":
        roles = {"text": columns.get("text", "text"), "text_pair": columns.get("text_pair", "text_pair")}
        return [tuple(roles.get(n, n) for n in template_fields(spec.template) if n != MASK_FIELD)]
    text = (columns.get("text", "text"),)
    return [text + ((columns.get("text_pair", "text_pair"),) if task.text_fields == 2 else ())]


def _prompts_and_responses(table: dict[str, list], spec: DataSpec, task: CausalLMTask, field: str,
                           path: str) -> dict:
    """Each example's prompt (the prompt column, or the template filled from the example's columns) and response;
    or, for chat data (a `messages` column), each example's conversation."""
    if _is_chat(table, spec):
        conversations = _column(table, spec, "messages", field, path)
        for i, conversation in enumerate(conversations):
            _check_conversation(conversation, f"{field}: {path} example {i + 1}")
        return {"messages": conversations}
    response = _texts(_column(table, spec, "response", field, path), "response", field, path)
    if task.template is None:
        prompts = _texts(_column(table, spec, "prompt", field, path), "prompt", field, path)
        return {"prompt": prompts, "response": response}
    names = template_fields(task.template)
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"data.template names {', '.join(map(repr, missing))}, which {field} {path} lacks (its "
                        f"columns: {', '.join(map(str, table))}); use its columns' names in braces")
    rows = range(len(response))
    values = {n: _texts(table[n], n, field, path) for n in names}
    return {"prompt": [task.template.format_map({n: values[n][i] for n in names}) for i in rows],
            "response": response}


CHAT_ROLES = ("system", "user", "assistant")


def _is_chat(table: dict[str, list], spec: DataSpec) -> bool:
    """Chat data: the job maps `messages`, or the file has a messages column and no prompt/response mapping."""
    if "messages" in spec.columns:
        return True
    return "messages" in table and not {"prompt", "response"} & set(spec.columns) and spec.template is None


def _check_conversation(conversation, where: str) -> None:
    """The OpenAI chat format: a list of {role, content} with roles system, user, assistant, and something for the
    model to learn (an assistant message)."""
    if not isinstance(conversation, list) or not conversation:
        raise UserError(f"{where}: messages is {type(conversation).__name__}, not a list of {{role, content}} "
                        "messages (the OpenAI chat format)")
    for j, message in enumerate(conversation):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or \
                message.get("role") not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {j + 1} ({json_preview(message)}) is not {{role: system|user|assistant"
                            ", content: text}}; fix the file")
    if not any(m["role"] == "assistant" for m in conversation):
        raise UserError(f"{where}: no assistant message, so nothing to learn; every conversation needs at least one")


def json_preview(value, limit: int = 60) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def template_fields(template: str) -> list[str]:
    """The column names a template fills, e.g. ['question'] for 'Q: {question}'; `{{` is a literal brace."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError(f"data.template: {err}; write a column's name in braces, and {{{{ for a brace") from None
    bad = [f for f in fields if not f.isidentifier() and not f.replace("-", "_").isidentifier()]
    if bad or "" in fields:
        raise UserError(f"data.template: {{{bad[0] if bad else ''}}} is not a column name; write a column's name in "
                        "braces, and {{ for a brace")
    return list(dict.fromkeys(fields))


def _texts(values: list, role: str, field: str, path: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise UserError(f"{field}: {path} example {i + 1}: its {role} is {v!r}, not text; every example needs a "
                            f"{role}")
    return values


def _labels(values: list, task: LabelledTask, field: str, path: str) -> list:
    if task.is_regression:
        out = []
        for i, v in enumerate(values):
            try:
                number = float(v)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(v, bool) or not math.isfinite(number):
                raise UserError(f"{field}: {path} example {i + 1}: label {v!r} is not a finite number; a regression "
                                "task's labels are numbers")
            out.append(number)
        return out
    index = {name: i for i, name in enumerate(task.labels)}
    out = []
    for i, v in enumerate(values):
        name = _label_name(v)
        if name not in index:
            raise UserError(f"{field}: {path} example {i + 1}: label {v!r} is not in the label set "
                            f"[{', '.join(task.labels)}]; fix the example, or list every label in data.labels")
        out.append(index[name])
    return out


def check_data(spec: DataSpec) -> None:
    """Before anything starts: GLUE's folder holds the task's files, or your files are there and of a form rayeff
    reads (their columns and labels are checked as they are tokenised, still before Ray starts)."""
    if not spec.own:
        glue.check_data_dir(spec.task, spec.data_dir)
        return
    if spec.dataset is not None:
        files.check_dataset(spec.dataset)
        return
    files.check_data_file(spec.train_file, "data.train_file")
    if spec.dev_file is not None:
        files.check_data_file(spec.dev_file, "data.dev_file")
