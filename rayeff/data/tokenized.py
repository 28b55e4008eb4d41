"""Tokenised splits (a GLUE preset's or your own data's), cached on disk, sub-sampled, and batched.

The cache key is (tokenizer, task, split, max length, data source): a tokenizer is identified by the hash of its
full serialised form, so two checkpoints that share a tokenizer share the cache; your own data by the hash of its
files' bytes, its column mapping, label set and held-out draw. Entries are written to a temporary
name and renamed, under a file lock, so concurrent workers never read half a cache entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch
from filelock import FileLock

from rayeff.config import DataSpec
from rayeff.data.files import content_hash, dataset_fingerprint
from rayeff.data.glue import get_task, split_file
from rayeff.data.task import load_examples, task_of


def default_cache_dir() -> Path:
    from rayeff.cluster.storage import rayeff_cache_dir

    return rayeff_cache_dir()


def _tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's serialised vocabulary and rules; the truncation and padding settings are left out,
    since calling the tokenizer changes them."""
    return _fingerprint_of(tokenizer, len(tokenizer))


@functools.lru_cache(maxsize=8)
def _fingerprint_of(tokenizer, size: int) -> str:
    """Memoised: serialising a 30k-token vocabulary takes about 0.3 s, and a run asks once per split. `size` is
    part of the key, so a tokenizer that gained tokens is hashed anew."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        ident = f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{size}"
    else:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        ident = json.dumps(state, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _source_fingerprint(spec: DataSpec, split: str) -> str:
    if spec.own:
        task = task_of(spec)
        if spec.dataset is not None:
            splits = [("data.train_split", spec.train_split)] + ([("data.dev_split", spec.dev_split)]
                                                                 if spec.dev_split else [])
            files = [spec.dataset, spec.dataset_config] + [dataset_fingerprint(spec.dataset, spec.dataset_config,
                                                                               name, field) for field, name in splits]
        else:
            files = [content_hash(spec.train_file)] + ([content_hash(spec.dev_file)] if spec.dev_file else [])
        return json.dumps({"files": files, "columns": spec.columns, "task": repr(task), "format": 2,
                           "held_out": [spec.dev_fraction, spec.seed], "chat_template": spec.chat_template},
                          sort_keys=True)
    if spec.data_dir is None:
        return "hub"
    path = split_file(get_task(spec.task), split, spec.data_dir)
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _cache_path(spec: DataSpec, split: str, tokenizer, max_length: int, scoring: str | None) -> Path:
    # what else decides the tokens beyond the vocabulary: the special tokens a prompt starts and a response ends
    # with, and the chat template (two checkpoints may share tokenizer.json and differ in these)
    special = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id,
                          getattr(tokenizer, "chat_template", None)])
    prompting = [spec.template, spec.label_words, scoring, tokenizer.mask_token_id] if scoring else []
    key = "|".join([_tokenizer_fingerprint(tokenizer), special, spec.display_name, split, str(max_length),
                    _source_fingerprint(spec, split)] + ([json.dumps(prompting)] if prompting else []))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.display_name)[:40]
    return root / "tokenized" / f"{name}-{split}-{max_length}-{digest}"


def _tokenize(columns: dict, tokenizer, max_length: int, chat_template: str | None,
              scoring: str | None) -> datasets.Dataset:
    if "messages" in columns:
        return _tokenize_conversations(columns["messages"], tokenizer, max_length, chat_template)
    if scoring is not None:
        ids = [prompt_ids(p, tokenizer, max_length, scoring) for p in columns["prompt"]]
        return datasets.Dataset.from_dict({"input_ids": ids, "label": columns["label"]})
    if "prompt" in columns:
        return _tokenize_prompts_and_responses(columns, tokenizer, max_length)
    encoded = tokenizer(columns["text_a"], columns["text_b"], truncation=True, max_length=max_length)
    data = {"input_ids": encoded["input_ids"], "label": columns["label"]}
    if "token_type_ids" in encoded:
        data["token_type_ids"] = encoded["token_type_ids"]
    return datasets.Dataset.from_dict(data)


IGNORE_INDEX = -100   # a label position the loss skips (torch's cross_entropy default ignore_index)


def start_tokens(tokenizer) -> list[int]:
    """What a prompt starts with: the tokenizer's BOS where it has its own (Llama's), else nothing (GPT-2's BOS is
    its EOS)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and bos != tokenizer.eos_token_id else []


def end_token(tokenizer) -> int | None:
    """What ends a response: EOS, or SEP for a tokenizer without one (the tiny models share MiniLM's)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _tokenize_prompts_and_responses(columns: dict, tokenizer, max_length: int) -> datasets.Dataset:
    """input_ids = [bos] prompt response [eos]; labels the same with every prompt position IGNORE_INDEX, so only the
    response (and its end) is learned. Prompt and response are tokenised apart, as LLaMA-Factory and torchtune do,
    so the boundary is where the data puts it. Too long: the response keeps at least half of max_length, the prompt
    loses its start (after BOS, which stays)."""
    bos, end = start_tokens(tokenizer), end_token(tokenizer)
    prompts = tokenizer(columns["prompt"], add_special_tokens=False)["input_ids"]
    responses = tokenizer(columns["response"], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for prompt, response in zip(prompts, responses):
        response = response + ([end] if end is not None else [])
        if len(bos) + len(prompt) + len(response) > max_length:
            response = response[:max(max_length - len(bos) - len(prompt), max_length // 2)]
            prompt = prompt[len(prompt) - (max_length - len(bos) - len(response)):]   # its start goes, not BOS
        prompt = bos + prompt
        ids.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


SCORINGS = {"decoder": "next_token", "encoder": "mask"}


def prompt_scoring(kind: str) -> str | None:
    """How a model of this kind scores a prompted example's label words: at the next token after the prompt (a
    decoder), at the mask token (a masked LM); None for an encoder-decoder, which does neither."""
    return SCORINGS.get(kind)


def scoring_of(spec: DataSpec, source) -> str | None:
    """The prompt scoring a job's data and model take, read from the model's config alone (no weights)."""
    if spec.task_type != "prompted_classification":
        return None
    from rayeff.models import backbone_kind, model_config

    return prompt_scoring(backbone_kind(model_config(source)))


def prompt_ids(prompt: str, tokenizer, max_length: int, scoring: str) -> list[int]:
    """A filled prompt's tokens (data/task.py marks its {mask} with MASK_SENTINEL); the text before the mask is
    right-stripped, the label word bringing its own space. next_token: [bos] text-before-the-mask, the label word
    predicted after its last token. mask: the tokenizer's special tokens around text-before, its mask token, and
    text-after. Too long: the text before the mask loses its start, then the text after it its end. (Should a text
    hold the mask token's own string, the last mask is the scored one, as PromptedClassifier.pool reads it.)"""
    from rayeff.data.task import MASK_SENTINEL

    before, _, after = prompt.partition(MASK_SENTINEL)
    if scoring == "next_token":
        head = tokenizer(before.rstrip(), add_special_tokens=False)["input_ids"]
        start = start_tokens(tokenizer)
        return start + head[max(0, len(head) - (max_length - len(start))):]
    # the mask: the whole text tokenised with the tokenizer's mask token in it, so its special tokens and spacing
    # are the tokenizer's own
    ids = tokenizer((before.rstrip() + " " if before.strip() else "") + tokenizer.mask_token + after)["input_ids"]
    excess = len(ids) - max_length
    if excess <= 0:
        return ids
    lead, trail = special_token_counts(tokenizer)
    mask_at = len(ids) - 1 - ids[::-1].index(tokenizer.mask_token_id)
    cut = min(excess, mask_at - lead)             # from the start of the text before the mask
    ids = ids[:lead] + ids[lead + cut:]
    excess -= cut
    if excess > 0:                                # then from the end of the text after it
        ids = ids[:len(ids) - trail - excess] + ids[len(ids) - trail:]
    return ids


def special_token_counts(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after a text ([CLS] and [SEP]: 1 and 1)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    lead = next(i for i in range(len(full)) if full[i:i + len(probe)] == probe)
    return lead, len(full) - lead - len(probe)


def label_word_ids(tokenizer, task) -> list[list[int]]:
    """Each label's words as token ids, one token each (the LM head scores one position)."""
    from rayeff.errors import UserError

    out = []
    for label, words in zip(task.labels, task.label_words):
        ids = []
        for word in words:
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                pieces = tokenizer.convert_ids_to_tokens(tokens)
                raise UserError(f"data.label_words: {word!r} (label {label}) is {len(tokens)} tokens {pieces} for "
                                "this tokenizer; choose a word that is one token (in a BPE vocabulary, with a "
                                "leading space, e.g. ' great')")
            ids.append(tokens[0])
        out.append(ids)
    flat = [i for ids in out for i in ids]
    if len(set(flat)) != len(flat):
        raise UserError("data.label_words: two labels share a word (the same token); give each label its own")
    return out


def render_chat(tokenizer, chat_template: str | None, messages: list[dict], generation_prompt: bool) -> str:
    """A conversation as the chat template (the job's, else the tokenizer's) writes it; with `generation_prompt`,
    followed by the header that opens the assistant's turn."""
    from rayeff.errors import UserError

    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError("data.chat_template: the tokenizer has no chat template; give one in the job (a Jinja "
                        "template, as tokenizer_config.json holds)")
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001  (Jinja raises several types)
        raise UserError(f"data.chat_template: it cannot render a conversation ({str(err)[:160]})") from None


def _tokenize_conversations(conversations: list, tokenizer, max_length: int,
                            chat_template: str | None) -> datasets.Dataset:
    """Each conversation rendered by the chat template (the job's, else the tokenizer's) and tokenised once; the
    tokens of each assistant message's reply are learned, everything else (system and user turns, and the header
    that opens the assistant's turn) is IGNORE_INDEX. Where a reply lies is found by rendering the conversation up to
    it (with the generation prompt) and through it: a template that does not render a conversation's beginning as
    the beginning of its rendering is refused. Too long: cut at max_length."""
    from rayeff.errors import UserError

    def render(messages, generation_prompt: bool) -> str:
        return render_chat(tokenizer, chat_template, messages, generation_prompt)

    ids, labels = [], []
    for conversation in conversations:
        text, spans = render(conversation, False), []
        for i, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            start, end = len(render(conversation[:i], True)), len(render(conversation[:i + 1], False))
            if not (text.startswith(render(conversation[:i], True)) and text.startswith(
                    render(conversation[:i + 1], False))):
                raise UserError("data.chat_template: it renders a conversation's first turns differently from the "
                                "start of the whole conversation, so the assistant's replies cannot be located")
            spans.append((start, end))
        encoded = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length,
                            return_offsets_mapping=True)
        learned = [any(a <= lo < b for a, b in spans) for lo, _ in encoded["offset_mapping"]]
        ids.append(encoded["input_ids"])
        labels.append([t if keep else IGNORE_INDEX for t, keep in zip(encoded["input_ids"], learned)])
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


def tokenized_split(spec: DataSpec, split: str, tokenizer, max_length: int,
                    scoring: str | None = None) -> datasets.Dataset:
    """The whole split, tokenised (from the cache when it holds this key); `scoring` (prompt_scoring) for a
    prompted task."""
    path = _cache_path(spec, split, tokenizer, max_length, scoring)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_dir():
            dataset = _tokenize(load_examples(spec, split), tokenizer, max_length, spec.chat_template, scoring)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.save_to_disk(str(tmp))
            os.replace(tmp, path)
    return datasets.load_from_disk(str(path))


def sample_indices(labels: list, spec: DataSpec, is_regression: bool) -> np.ndarray | None:
    """Indices of the training examples to keep (None: all), drawn with the data seed."""
    rng = np.random.default_rng(spec.seed)
    if spec.train_subset is not None:
        if spec.train_subset >= len(labels):
            return None
        return np.sort(rng.choice(len(labels), size=spec.train_subset, replace=False))
    if spec.k_shot is not None:
        if is_regression:
            raise ValueError("data.k_shot needs a classification task; use data.train_subset for a regression "
                             "task such as STS-B")
        labels = np.asarray(labels)
        picked = []
        for cls in np.unique(labels):
            members = np.flatnonzero(labels == cls)
            picked.append(rng.choice(members, size=min(spec.k_shot, len(members)), replace=False))
        return np.sort(np.concatenate(picked))
    return None


def load_train_and_dev(spec: DataSpec, tokenizer, max_length: int,
                       scoring: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    task = task_of(spec)
    train = tokenized_split(spec, "train", tokenizer, max_length, scoring)
    # a causal-LM set has no labels; only train_subset (by count) applies to it
    labels = train["label"] if "label" in train.column_names else [None] * len(train)
    keep = sample_indices(labels, spec, task.is_regression)
    if keep is not None:
        train = train.select(keep)
    if spec.packing:
        train = pack(train, max_length)
    dev = tokenized_split(spec, "dev", tokenizer, max_length, scoring)
    if spec.eval_subset is not None and spec.eval_subset < len(dev):
        dev = dev.select(range(spec.eval_subset))
    return train, dev


def pack(examples: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Causal-LM examples packed into rows of at most max_length tokens: whole examples, in order, a new row when the
    next would not fit. Each row's `position_ids` restart at 0 for every example, which is how the model (transformers'
    masking, from positions when no attention mask is given) keeps each example attending only to itself; the first
    token of each example is never a target, so no example learns from the one before it."""
    rows: list[dict] = []
    for ids, labels in zip(examples["input_ids"], examples["labels"]):
        if not rows or len(rows[-1]["input_ids"]) + len(ids) > max_length:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
        row = rows[-1]
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]
        row["position_ids"] += list(range(len(ids)))
    return datasets.Dataset.from_list(rows)


class Collator:
    """Pads a list of examples into a batch; `index` carries each example's position for de-duplicated eval. A
    causal-LM example's `labels` (token ids, IGNORE_INDEX where not learned) are padded with IGNORE_INDEX."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to_max: bool, use_token_types: bool,
                 regression: bool):
        self.pad_token_id, self.max_length, self.pad_to_max = pad_token_id, max_length, pad_to_max
        self.use_token_types, self.regression = use_token_types, regression

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = self.max_length if self.pad_to_max else max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        types = torch.zeros((len(examples), width), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids[row, :n] = torch.tensor(ex["input_ids"])
            mask[row, :n] = 1
            if self.use_token_types and "token_type_ids" in ex:
                types[row, :n] = torch.tensor(ex["token_type_ids"])
        if "labels" in examples[0]:
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
            for row, ex in enumerate(examples):
                labels[row, :len(ex["labels"])] = torch.tensor(ex["labels"])
        else:
            dtype = torch.float32 if self.regression else torch.long
            labels = torch.tensor([e["label"] for e in examples], dtype=dtype)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
                 "index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}
        if "position_ids" in examples[0]:   # packed rows: padding continues the last example's positions
            positions = torch.arange(width).repeat(len(examples), 1)
            for row, ex in enumerate(examples):
                n = len(ex["position_ids"])
                positions[row, :n] = torch.tensor(ex["position_ids"])
                positions[row, n:] += ex["position_ids"][-1] + 1 - n
            batch["position_ids"] = positions
        if self.use_token_types:
            batch["token_type_ids"] = types
        return batch
