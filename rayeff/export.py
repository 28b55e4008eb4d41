"""A finished run as a folder, and any such folder (or a run's own) loaded back:

    rayeff export RUN_DIR --output DIR                 # see the forms below
    rayeff export RUN_DIR --output DIR --adapter-only  # LoRA: a PEFT adapter folder for the base model
    model = rayeff.load(DIR)                           # a torch module giving the trained model's outputs

The run's model is rebuilt as its workers built it (the job it ran, the same seed) and its trained tensors
(`final/trainable.safetensors`) put back. It is then written in one of three forms, with the tokenizer, the job
(`rayeff_job.yaml`), a model card (method, data, dev metrics, energy, memory) and `rayeff_export.json` naming the form:

    language_model       a causal_lm or prompted_classification run whose training lives in the model's own weights
                         (full, MeZO, LoRA merged, a native MoE model's experts): AutoModelForCausalLM (a masked LM:
                         AutoModelForMaskedLM).from_pretrained(DIR)
    sequence_classifier  a classification or regression run of those methods on a BERT- or RoBERTa-style encoder
                         whose head reads the first token (model.head mlp, pooling first: Hugging Face's own head
                         layout): AutoModelForSequenceClassification.from_pretrained(DIR)
    rayeff               everything else (READ's side network, AdaZeta's adapters, an upcycled MoE, a mean-pooled or
                         decoder classifier): the base model's reference and the trained tensors; rayeff.load(DIR)
                         rebuilds the model, which needs the base model where it loads (its hub id or folder)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rayeff.errors import UserError

LANGUAGE_MODEL_TASKS = ("causal_lm", "prompted_classification")   # the model is the language model, its head kept
EXPORT_FILE = "rayeff_export.json"
JOB_FILE = "rayeff_job.yaml"
WEIGHTS_FILE = "trainable.safetensors"   # the rayeff form's trained tensors


def export_run(run_dir: str, output: str, adapter_only: bool = False) -> tuple[Path, str]:
    """Writes the export; returns its folder and form."""
    from rayeff.models import load_tokenizer, resolve_model
    from rayeff.train.checkpointer import TRAINABLE_FILE

    run, out = Path(run_dir), Path(output)
    job, result = finished_run(run)
    _check_output(out)
    if adapter_only and job.method.name != "lora":
        raise UserError(f"--adapter-only: a {job.method.name} run has no adapter; leave --adapter-only out")
    from rayeff.data.task import task_of, task_record

    task = task_of(job.data)
    lm, model = rebuild_trained(run / "final" / TRAINABLE_FILE, job, task)
    form = "adapter" if adapter_only else export_form(job, model)
    out.mkdir(parents=True, exist_ok=True)
    if form in ("language_model", "sequence_classifier") and _has_lora(model):
        model.backbone = model.backbone.merge_and_unload()   # the decoder (encoder) inside `lm`, merged in place
    if form == "adapter":
        _save_adapter(model, job, out)
    elif form == "language_model":
        lm.save_pretrained(str(out), safe_serialization=True)
    elif form == "sequence_classifier":
        _hugging_face_classifier(model, task).save_pretrained(str(out), safe_serialization=True)
    else:
        shutil.copyfile(run / "final" / TRAINABLE_FILE, out / WEIGHTS_FILE)
    load_tokenizer(resolve_model(job.model.name)).save_pretrained(str(out))
    (out / JOB_FILE).write_text((run / "job.yaml").read_text())
    (out / EXPORT_FILE).write_text(json.dumps({"form": form, "method": job.method.name, "base_model": job.model.name,
                                               "task": task_record(task)}, indent=1) + "\n")
    (out / "README.md").write_text(model_card(job, result, form))
    return out, form


def export_form(job, model: nn.Module) -> str:
    """Which of the three forms (see the module's docstring) a run's trained model takes."""
    method = job.method
    in_weights = method.name in ("full", "lora", "mezo") or (
        method.name == "moe" and method.upcycle is None and method.trainable != "lora")
    if not in_weights:
        return "rayeff"
    if job.data.task_type in LANGUAGE_MODEL_TASKS:
        return "language_model"
    return "sequence_classifier" if _classifier_layout(model) is not None else "rayeff"


def _has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model.backbone, PeftModel)


def _classifier_layout(model: nn.Module) -> str | None:
    """"bert" (pooler dense + tanh, then a linear classifier) or "roberta" (dense + tanh + out_proj), when the
    classifier is an encoder of that family read at its first token by the mlp head; else None."""
    from rayeff.models import SequenceClassifier

    if not isinstance(model, SequenceClassifier) or model.kind != "encoder" or model.pooling != "first" or \
            model.head.dense is None:
        return None
    families = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta"}
    return families.get(model.backbone.config.model_type)


def _hugging_face_classifier(model: nn.Module, task) -> nn.Module:
    """The trained classifier as Hugging Face's own (BertForSequenceClassification, RobertaForSequenceClassification):
    the same backbone weights, our head's dense layer as its pooler (BERT) or head dense (RoBERTa), our output layer
    as its classifier."""
    import copy

    from transformers import AutoModelForSequenceClassification

    backbone = model.backbone
    config = copy.deepcopy(backbone.config)
    config.num_labels = task.num_labels
    if task.is_regression:
        config.problem_type = "regression"
    else:
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: i for i, label in enumerate(task.labels)}
    hf = AutoModelForSequenceClassification.from_config(config).eval()
    base = hf.base_model
    missing = set(base.state_dict()) - set(backbone.state_dict()) - {k for k in base.state_dict()
                                                                     if k.startswith("pooler.")}
    if missing:
        raise UserError(f"the trained {config.model_type} encoder does not fill Hugging Face's "
                        f"({sorted(missing)[:2]}); this run cannot export as a sequence classifier")
    base.load_state_dict(backbone.state_dict(), strict=False)
    if _classifier_layout(model) == "bert":
        base.pooler.dense.load_state_dict(model.head.dense.state_dict())
        hf.classifier.load_state_dict(model.head.out.state_dict())
    else:
        hf.classifier.dense.load_state_dict(model.head.dense.state_dict())
        hf.classifier.out_proj.load_state_dict(model.head.out.state_dict())
    return hf


def rebuild_trained(weights_path: Path, job, task=None) -> tuple[nn.Module | None, nn.Module]:
    """(the Hugging Face language model inside, or None for a classifier; rayeff's model) with the trained tensors
    of `weights_path` in place, in eval mode. Built after seeding as each worker seeds, so a tiny random-weight
    backbone (and a classifier head's untrained parts) come out as they trained. `task` defaults to the job's
    data's (which reads the data)."""
    from safetensors.torch import load_file

    from rayeff.data.task import task_of
    from rayeff.methods import get_method
    from rayeff.models import load_tokenizer, resolve_model
    from rayeff.train.run_setup import build_base

    source, task = resolve_model(job.model.name), task or task_of(job.data)
    torch.manual_seed(job.training.seed)
    lm, base = build_base(source, task, job, load_tokenizer(source))
    model = get_method(job.method.name).build(base, job.method)
    weights = load_file(str(weights_path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # loaded first, so that a module's load hooks may rename tensors saved under earlier names
    try:
        loaded = model.load_state_dict(weights, strict=False)
    except RuntimeError:   # a tensor of another shape
        loaded = None
    if loaded is None or loaded.unexpected_keys or trainable & set(loaded.missing_keys):
        raise UserError(f"{weights_path}: its tensors are not those a {job.method.name} model of {job.model.name} "
                        f"trains ({len(weights)} saved, {len(trainable)} expected); was the job changed?")
    return (lm.eval() if lm is not None else None), model.eval()


@dataclass
class Trained:
    """A trained model as rayeff.load reads it, with what it was trained on."""
    job: object
    task: object
    model: nn.Module      # model(input_ids, attention_mask[, token_type_ids]) -> logits, in eval mode
    tokenizer: object
    scoring: str | None   # a prompted task's: where the label words are read (data/tokenized.py prompt_scoring)


def load(path: str | Path) -> nn.Module:
    """The trained model of a `rayeff export` folder (any form) or of a finished run's folder, as a torch module in
    eval mode: `model(input_ids=..., attention_mask=...)` returns the logits the trained model gives (class logits;
    a causal LM's next-token logits; a prompted classifier's label-word logits)."""
    return load_trained(Path(path)).model


def load_trained(folder: Path) -> Trained:
    from rayeff.data.tokenized import prompt_scoring
    from rayeff.models import ModelSource, backbone_kind, load_tokenizer, resolve_model
    from rayeff.train.checkpointer import TRAINABLE_FILE
    from rayeff.train.run_setup import build_base

    record = export_record(folder)
    form = record and record["form"]
    job, task = trained_job_and_task(folder, record)
    if form in (None, "rayeff"):   # a run's folder, or the trained tensors on the base model
        weights = folder / "final" / TRAINABLE_FILE if form is None else folder / WEIGHTS_FILE
        lm, model = rebuild_trained(weights, job, task)
        tokenizer = load_tokenizer(resolve_model(job.model.name))
    else:
        exported = ModelSource(job.model.name, str(folder), str(folder))
        tokenizer = load_tokenizer(exported)
        if form == "language_model":
            lm, model = build_base(exported, task, job, tokenizer)
        else:
            from transformers import AutoModelForSequenceClassification

            lm, model = None, HuggingFaceLogits(AutoModelForSequenceClassification.from_pretrained(str(folder)))
    scoring = prompt_scoring(backbone_kind(lm.config)) if task.kind == "prompted" else None
    return Trained(job, task, model.eval(), tokenizer, scoring)


def trained_job_and_task(folder: Path, record: dict | None = None):
    """The job behind a run's folder (checked finished) or an export (`record`, its rayeff_export.json: read here
    when not given), and its task, without loading the model: an export's task is the one it recorded, so its data
    need not be at hand."""
    from rayeff.config import load_job
    from rayeff.data.task import task_from_record, task_of

    record = record or export_record(folder)
    if record is None:
        job = finished_run(folder)[0]
        return job, task_of(job.data)
    job = load_job(folder / JOB_FILE)
    return job, task_from_record(record["task"]) if record.get("task") else task_of(job.data)


def export_form_of(folder: Path) -> str | None:
    """The form of an export folder; None for a finished run's folder; a one-line error for anything else."""
    record = export_record(folder)
    return record and record["form"]


def export_record(folder: Path) -> dict | None:
    """An export folder's rayeff_export.json (form, method, base model, task); None for a finished run's folder; a
    one-line error for anything else, and for an adapter-only export, which PEFT loads rather than rayeff."""
    if (folder / EXPORT_FILE).is_file():
        record = json.loads((folder / EXPORT_FILE).read_text())
        if record.get("form") == "adapter":
            raise UserError(f"{folder} is an adapter-only export, which PEFT loads onto its base model; give the "
                            "run's folder or an export without --adapter-only")
        return record
    if (folder / "job.yaml").is_file():
        return None
    raise UserError(f"{folder} is neither a run's folder (job.yaml, result.json, final/) nor one `rayeff export` "
                    "wrote; give one of those")


class HuggingFaceLogits(nn.Module):
    """A Hugging Face model called as rayeff's models are: `model(input_ids, attention_mask, ...) -> logits`."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_unused) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def _save_adapter(model: nn.Module, job, out: Path) -> None:
    """The trained LoRA factors as PEFT saves them for the whole language model (not the decoder or encoder rayeff
    wrapped), so that `PeftModel.from_pretrained(AutoModelForCausalLM..., DIR)` (or AutoModelForMaskedLM) finds
    each under its name."""
    from peft import LoraConfig, get_peft_model

    from rayeff.models import backbone_kind, load_language_model, resolve_model

    source = resolve_model(job.model.name)
    torch.manual_seed(job.training.seed)
    base = load_language_model(source, job.model.dropout)
    config = LoraConfig(r=job.method.rank, lora_alpha=job.method.alpha, lora_dropout=job.method.dropout,
                        target_modules=job.method.target_modules,
                        task_type="CAUSAL_LM" if backbone_kind(base.config) == "decoder" else None,
                        base_model_name_or_path=source.weights or job.model.name)
    decoder = next(name for name, module in base.named_modules() if module is base.base_model)
    peft_lm = get_peft_model(base, config)
    inner = "backbone.base_model.model."   # where rayeff's LoRA factors sit: its decoder wrapped by PEFT
    factors = {f"base_model.model.{decoder}.{n[len(inner):]}": p.detach()
               for n, p in model.named_parameters() if p.requires_grad and n.startswith(inner)}
    missing = set(factors) - {n for n, _ in peft_lm.named_parameters()}
    if missing or not factors:
        raise UserError(f"the LoRA factors of {job.model.name} do not map onto PEFT's language model "
                        f"({sorted(missing)[:2]}); export without --adapter-only")
    peft_lm.load_state_dict(factors, strict=False)
    peft_lm.save_pretrained(str(out))


LOADS_WITH = {"language_model": "`AutoModelForCausalLM.from_pretrained(DIR)` (a masked LM: `AutoModelForMaskedLM`)",
              "sequence_classifier": "`AutoModelForSequenceClassification.from_pretrained(DIR)`",
              "adapter": "`PeftModel.from_pretrained(base_model, DIR)`",
              "rayeff": "`rayeff.load(DIR)` (it rebuilds the base model and puts the trained tensors in place)"}


def model_card(job, result: dict, form: str) -> str:
    data = job.data
    source = (f"`{Path(data.train_file).name}`" if data.train_file else f"dataset `{data.dataset}`" if data.dataset
              else f"GLUE {data.task}")
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.get("metrics", {}).items())
    energy, memory, timing = result.get("energy", {}), result.get("memory", {}), result.get("time", {})
    estimate = f" (an estimate: {energy['formula']})" if energy.get("source") == "estimate" else ""
    what = "a LoRA adapter (PEFT) for" if form == "adapter" else "fine-tuned from"
    training = (f"{timing.get('steps')} steps, batch {job.training.batch_size}, lr {job.training.lr:g}, seed "
                f"{job.training.seed}, {result.get('workers')} worker(s)")
    peak = (f"{memory.get('trainable_params')} trainable of {memory.get('total_params')} parameters; peak device "
            f"{memory.get('peak_device_bytes')} bytes, tensor account {memory.get('tensor_account_bytes')} bytes")
    template = f", template {data.template!r}" if data.template else ""
    if data.label_words:
        template += f", label words {json.dumps(data.label_words)}"
    return f"""# {job.method.name} · {job.model.name} · {result.get('task', data.display_name)}

This folder is {what} `{job.model.name}`, exported by `rayeff export` from a rayeff run. It loads with
{LOADS_WITH[form]}.

| | |
|---|---|
| method | {job.method.name} ({json.dumps(job.method.model_dump(exclude={'name'}))}) |
| data | {source}, task type {data.task_type}{template} |
| training | {training} |
| dev metrics | {metrics} |
| energy | {energy.get('joules', 0):.4g} J, source {energy.get('source')}{estimate} |
| memory | {peak} |

The job as it ran is `rayeff_job.yaml`; every figure above is from its `result.json`.
"""


def finished_run(run: Path):
    """(the job it ran, its result) of a finished run's folder; a one-line error for anything else."""
    from rayeff.config import load_job
    from rayeff.train.checkpointer import TRAINABLE_FILE

    if not run.is_dir():
        raise UserError(f"RUN_DIR: {run} is not a folder; give a run's output folder (its output_dir)")
    for name in ("job.yaml", "result.json", f"final/{TRAINABLE_FILE}"):
        if not (run / name).is_file():
            raise UserError(f"RUN_DIR: {run} has no {name}; export a finished run (or finish it with "
                            "`rayeff run JOB --output RUN_DIR --resume`)")
    try:
        result = json.loads((run / "result.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"RUN_DIR: {run}/result.json cannot be read ({err}); is this a rayeff run?") from None
    return load_job(run / "job.yaml"), result


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output: {out} already exists and is not an empty folder; choose another --output")
