"""A finished run as a folder that Hugging Face loads:

    rayeff export RUN_DIR --output DIR                 # AutoModelForCausalLM.from_pretrained(DIR) and its tokenizer
    rayeff export RUN_DIR --output DIR --adapter-only  # LoRA: a PEFT adapter folder for the base model

The run's model is rebuilt as its workers built it (the job it ran, the same seed), its trained tensors
(`final/trainable.safetensors`) put back, LoRA merged into the weights, and the result written with the tokenizer,
the job and a model card (method, data, dev metrics, energy, memory). For now: causal_lm and
prompted_classification runs of `full` and `lora`, whose model is the language model with its own head
(AutoModelForCausalLM, or AutoModelForMaskedLM for a masked-LM encoder; the label words and template are in the
card and the job).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rayeff.errors import UserError

EXPORTABLE = ("full", "lora", "moe")
LANGUAGE_MODEL_TASKS = ("causal_lm", "prompted_classification")   # the model is the language model, its head kept


def export_run(run_dir: str, output: str, adapter_only: bool = False) -> Path:
    run, out = Path(run_dir), Path(output)
    job, result = finished_run(run)
    _check_output(out)
    if job.data.task_type not in LANGUAGE_MODEL_TASKS:
        raise UserError(f"{run}: a {job.data.task_type} run; rayeff export writes causal_lm and "
                        "prompted_classification runs for now (a classifier's own head has no Hugging Face form yet)")
    if job.method.name not in EXPORTABLE:
        raise UserError(f"{run}: a {job.method.name} run; rayeff export writes {', '.join(EXPORTABLE)} runs for "
                        "now (READ and AdaZeta do not merge into the backbone; their export comes next)")
    if job.method.name == "moe" and (job.method.upcycle is not None or job.method.trainable == "lora"):
        raise UserError(f"{run}: an {'upcycled' if job.method.upcycle else 'expert-LoRA'} MoE run; rayeff export "
                        "writes MoE runs that fine-tuned a native MoE model's own weights (trainable: all or experts)"
                        ", whose architecture Hugging Face knows")
    if adapter_only and job.method.name != "lora":
        raise UserError(f"--adapter-only: a {job.method.name} run has no adapter; leave --adapter-only out")
    lm, model = rebuild_trained(run, job)
    out.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        _save_adapter(lm, model, job, out)
    else:
        if job.method.name == "lora":
            model.backbone = model.backbone.merge_and_unload()   # the decoder inside `lm`, merged in place
        lm.save_pretrained(str(out), safe_serialization=True)
    from rayeff.models import load_tokenizer, resolve_model

    load_tokenizer(resolve_model(job.model.name)).save_pretrained(str(out))
    (out / "rayeff_job.yaml").write_text((run / "job.yaml").read_text())
    (out / "README.md").write_text(model_card(job, result, adapter_only))
    return out


def rebuild_trained(run: Path, job) -> tuple[nn.Module | None, nn.Module]:
    """(the Hugging Face causal LM, or None for a classifier; rayeff's model) with the run's trained tensors in
    place, in eval mode. Built after seeding as each worker seeds, so a tiny random-weight backbone (and a classifier
    head's untrained parts) come out as they trained."""
    from safetensors.torch import load_file

    from rayeff.data.task import task_of
    from rayeff.methods import get_method
    from rayeff.models import load_tokenizer, resolve_model
    from rayeff.train.checkpointer import TRAINABLE_FILE
    from rayeff.train.run_setup import build_base

    source, task = resolve_model(job.model.name), task_of(job.data)
    torch.manual_seed(job.training.seed)
    lm, base = build_base(source, task, job, load_tokenizer(source))
    model = get_method(job.method.name).build(base, job.method)
    path = run / "final" / TRAINABLE_FILE
    weights = load_file(str(path))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise UserError(f"{path}: its tensors are not those a {job.method.name} model of {job.model.name} trains "
                        f"({len(weights)} saved, {len(trainable)} expected); was the run's job.yaml changed?")
    model.load_state_dict(weights, strict=False)
    return (lm.eval() if lm is not None else None), model.eval()


def _save_adapter(lm: nn.Module, model: nn.Module, job, out: Path) -> None:
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


def model_card(job, result: dict, adapter_only: bool) -> str:
    data = job.data
    source = f"`{Path(data.train_file).name}`" if data.train_file else f"GLUE {data.task}"
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.get("metrics", {}).items())
    energy, memory, timing = result.get("energy", {}), result.get("memory", {}), result.get("time", {})
    estimate = f" (an estimate: {energy['formula']})" if energy.get("source") == "estimate" else ""
    what = "a LoRA adapter (PEFT) for" if adapter_only else "fine-tuned from"
    training = (f"{timing.get('steps')} steps, batch {job.training.batch_size}, lr {job.training.lr:g}, seed "
                f"{job.training.seed}, {result.get('workers')} worker(s)")
    peak = (f"{memory.get('trainable_params')} trainable of {memory.get('total_params')} parameters; peak device "
            f"{memory.get('peak_device_bytes')} bytes, tensor account {memory.get('tensor_account_bytes')} bytes")
    template = f", template {data.template!r}" if data.template else ""
    if data.label_words:
        template += f", label words {json.dumps(data.label_words)}"
    return f"""# {job.method.name} · {job.model.name} · {result.get('task', data.display_name)}

This folder is {what} `{job.model.name}`, exported by `rayeff export` from a rayeff run.

| | |
|---|---|
| method | {job.method.name} ({json.dumps(job.method.model_dump(exclude={'name'}))}) |
| data | {source}, task type {data.task_type}{template} |
| training | {training} |
| dev metrics | {metrics} |
| energy | {energy.get('joules', 0):.4g} J, source {energy.get('source')}{estimate} |
| memory | {peak} |

The job as it ran is `rayeff_job.yaml`.
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
