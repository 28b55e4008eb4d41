"""Checks of a job's and a sweep's inputs before Ray starts: the cache folder, the model folder, the sequence length
against the model's positions, local GPUs, a checkpoint to resume from, the prior store. Each failure is a one-line
`UserError` naming the input and the fix (rayeff/checks.py has the file and folder checks they build on).

    check_job_inputs(job, source)                    # all of a job's paths and the sizes that only fail later
"""

from __future__ import annotations

import functools
from pathlib import Path

from rayeff.checks import check_output_file, check_output_location, path_exists
from rayeff.errors import UserError

TRAIN_DIR = "train"   # Ray Train's storage inside a run's output folder: its checkpoints


def check_cache_dir(cache_dir: str | None) -> None:
    from rayeff.data.tokenized import default_cache_dir

    location = str(cache_dir) if cache_dir else str(default_cache_dir())
    check_output_location(location, "data.cache_dir" if cache_dir else "the tokenised-data cache (RAYEFF_CACHE)")


# -- sizes that only fail later ---------------------------------------------------------------------------------------

# Models whose position table keeps its first (padding index + 1) rows for padding: usable positions are fewer.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "ibert")


def max_positions(source) -> int | None:
    """The most tokens the backbone can take (its learned position table), or None (relative positions: T5)."""
    from rayeff.models import TINY_CONFIGS

    if source.tiny_config is not None:
        spec = TINY_CONFIGS[source.tiny_config]
        return spec.get("max_position_embeddings") or spec.get("n_positions")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.weights)
    except Exception as err:  # noqa: BLE001  (a folder with a broken config.json, say)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"model.name: {source.name}: its config cannot be read ({first}); fix or replace the model "
                        "folder") from None
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "relative_attention_num_buckets", None):
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            if config.model_type in _OFFSET_POSITIONS:
                value -= (getattr(config, "pad_token_id", 1) or 1) + 1
            return value
    return None


def check_sequence_length(job, source) -> None:
    """max_seq_length within the model's positions (longer sequences fail at the first batch that has one), and at
    least the tokenizer's special tokens plus one token per text (below that the tokenizer silently does not
    truncate at all)."""
    from rayeff.data.task import task_of
    from rayeff.models import load_tokenizer

    length = job.training.max_seq_length
    limit = max_positions(source)
    if limit is not None and length > limit:
        raise UserError(f"training.max_seq_length: {length} exceeds the {limit} positions of model "
                        f"{job.model.name}; set it to at most {limit}")
    generated = job.data.eval_max_new_tokens or 0
    if limit is not None and length + generated > limit:
        raise UserError(f"data.eval_max_new_tokens: {generated} tokens after a dev prompt of up to {length} "
                        f"(training.max_seq_length) exceed the {limit} positions of model {job.model.name}; lower "
                        "one of them")
    texts = task_of(job.data).text_fields
    try:
        tokenizer = load_tokenizer(source)
    except Exception as err:  # noqa: BLE001  (a folder whose tokenizer files are broken, say)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"model.name: {source.name}: its tokenizer cannot be loaded ({first}); fix or replace the "
                        "model folder") from None
    least = tokenizer.num_special_tokens_to_add(pair=texts > 1) + texts
    if length < least:
        raise UserError(f"training.max_seq_length: {length} leaves no room for text ({job.data.display_name} "
                        f"examples take {least - texts} special tokens and {texts} text); set it to at least {least}")


def check_local_gpus(job, address: str | None) -> None:
    """A local Ray (no --address) has this machine's GPUs only: a job asking for more fails once Ray has started."""
    need = job.scaling.gpus_per_worker * job.scaling.num_workers
    if address or need <= 0:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if need > have:
        raise UserError(f"scaling.gpus_per_worker: {job.scaling.num_workers} workers x {job.scaling.gpus_per_worker:g} "
                        f"GPUs need {need:g} GPUs but this machine has {have}; set scaling.gpus_per_worker=0 to train "
                        "on CPUs, or pass --address to run on a cluster with GPUs")


# A model folder needs its weights and its tokenizer: without weights the workers fail as they build the model, and
# without tokenizer files transformers quietly builds an empty tokenizer that reads every word as [UNK].
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def check_model_folder(source) -> None:
    for folder, files, what in ((source.weights, WEIGHT_FILES, "weights"),
                                (source.tokenizer, TOKENIZER_FILES, "tokenizer")):
        if folder and Path(folder).is_dir() and not any((Path(folder) / f).is_file() for f in files):
            raise UserError(f"model.name: {source.name} has no {what} file ({', '.join(files)}); point it at a "
                            "complete Hugging Face model folder")


def check_model_suits_task(job, source) -> None:
    """A causal-LM task trains a decoder-only model: it predicts each next token from those before it. A prompted
    task reads a decoder's next token (so {mask} ends the template) or a masked LM's mask token (so the template has
    one, and the tokenizer a mask token); each label word is one token."""
    if job.data.task_type not in ("causal_lm", "prompted_classification"):
        return
    from rayeff.models import backbone_kind, model_config

    config = model_config(source)
    kind = backbone_kind(config)
    if job.data.task_type == "causal_lm":
        if kind != "decoder":
            raise UserError(f"model.name: a causal-LM task needs a decoder-only model; {config.model_type} is an "
                            f"{kind} (use e.g. tiny-llama, tiny-gpt2 or a Llama, Qwen or Mistral checkpoint)")
        return
    _check_prompting(job, source, config, kind)


def _check_prompting(job, source, config, kind: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from rayeff.data.task import MASK_FIELD, task_of
    from rayeff.data.tokenized import label_word_ids
    from rayeff.models import load_tokenizer, masked_lm_head

    template, mask = job.data.template, "{" + MASK_FIELD + "}"
    if kind == "encoder-decoder":
        raise UserError(f"model.name: prompted_classification reads a decoder's next token or a masked LM's mask "
                        f"token; {config.model_type} is an encoder-decoder (use a decoder or a BERT-style encoder)")
    if kind == "decoder" and mask in template and not template.rstrip().endswith(mask):
        raise UserError(f"data.template: {template!r} has text after {mask}; a decoder predicts the label word "
                        f"next, so {mask} ends the template (or leave it out)")
    tokenizer = load_tokenizer(source)
    if kind == "encoder":
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            raise UserError(f"model.name: {config.model_type} has no masked-LM form for prompted_classification; "
                            "use a BERT-style encoder or a decoder")
        masked_lm_head(_masked_lm_skeleton(source))   # a head rayeff can tell apart, or a one-line error
        if mask not in template:
            raise UserError(f"data.template: {template!r} has no {mask}; a masked LM scores the label words at "
                            f"its mask token, e.g. '{{text}} It was {mask}.'")
        if tokenizer.mask_token_id is None:
            raise UserError(f"model.name: {source.name}'s tokenizer has no mask token, which a masked LM's prompt "
                            "needs; use a decoder or a model whose tokenizer has one")
        missing = missing_head_weights(source)
        if missing:
            raise UserError(f"model.name: {source.name} has no pretrained masked-LM head ({missing[0]} and "
                            f"{len(missing) - 1} more are not in its weights), so its label-word scores would be "
                            "random; use a masked LM saved with its head (e.g. bert-base-uncased, roberta-large) or a "
                            "decoder")
    label_word_ids(tokenizer, task_of(job.data))


@functools.lru_cache(maxsize=2)
def _masked_lm_skeleton(source):
    """The model's AutoModelForMaskedLM form, built on the meta device from its config (no weights); memoised, as
    the prompted-task checks ask twice."""
    import torch
    from transformers import AutoModelForMaskedLM

    from rayeff.models import model_config

    with torch.device("meta"):
        return AutoModelForMaskedLM.from_config(model_config(source))


def missing_head_weights(source) -> list[str]:
    """The masked-LM head's weights that a local checkpoint's safetensors files lack (its decoder tied to the input
    embeddings aside; old BERT checkpoints' LayerNorm gamma/beta read as weight/bias, as transformers reads them);
    empty when they are all there, or when the files cannot tell (tiny random configs, hub ids, .bin checkpoints)."""
    import json

    from safetensors import safe_open

    if source.weights is None or not Path(source.weights).is_dir():
        return []
    folder = Path(source.weights)
    if (folder / "model.safetensors.index.json").is_file():
        keys = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"])
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
    else:
        return []
    from rayeff.models import masked_lm_head

    keys |= {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
             for k in keys}
    lm = _masked_lm_skeleton(source)
    head = masked_lm_head(lm)
    prefix = next(name for name, module in lm.named_children() if module is head)
    tied = lm.get_input_embeddings().weight
    names = [f"{prefix}.{name}" for name, p in head.named_parameters() if p is not tied]
    return [name for name in names if name not in keys]


def check_job_inputs(job, source) -> None:
    """A job's paths and sizes beyond what its spec validates: output folder creatable and writable, tokenised-data
    cache writable, max_seq_length within the model's positions, and on --resume every checkpoint file safe to
    load (see rayeff/train/checkpoint_safety.py)."""
    from rayeff.cluster.storage import is_uri

    check_tracking(job.tracking, job.output_dir)
    check_output_location(job.output_dir)
    check_cache_dir(job.data.cache_dir)
    check_model_folder(source)
    check_model_suits_task(job, source)
    check_sequence_length(job, source)
    if job.resume and not is_uri(job.output_dir):
        from rayeff.train.checkpoint_safety import check_checkpoint_files

        train = Path(job.output_dir).expanduser() / TRAIN_DIR
        if train.is_dir():
            check_checkpoint_files(train)


def check_tracking(tracking, output_dir: str) -> None:
    """The trackers a job (or sweep) names are installed, and a store kept in the output folder has a local one.
    Whether a tracking server answers is not checked here: a run never fails for want of its tracker."""
    import importlib.util

    from rayeff.cluster.storage import is_uri

    if tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        raise UserError("tracking.mlflow: MLflow is not installed here; pip install 'rayeff[tracking]' (or mlflow)")
    if tracking.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise UserError("tracking.tensorboard: tensorboardX is not installed here; pip install tensorboardX")
    local_only = [name for name, value in (("mlflow", tracking.mlflow), ("tensorboard", tracking.tensorboard))
                  if value is True or (name == "tensorboard" and isinstance(value, str)
                                       and not Path(value).expanduser().is_absolute())]
    if local_only and is_uri(output_dir):
        raise UserError(f"tracking.{local_only[0]}: it would be kept in the output folder {output_dir}, which is not "
                        "local; give an MLflow URI or an absolute folder")


def check_prior_store(path: str) -> None:
    """A sweep's prior store: an existing rayeff store, or a file that can be created (it is written when the sweep
    finishes, so a bad path must not wait until then)."""
    from rayeff.tune.priors import PriorStore

    store = Path(path).expanduser()
    if path_exists(store) and not store.is_dir():
        PriorStore(store).entries()   # a UserError naming priors.store when it is not a rayeff store
        return
    check_output_file(store, "priors.store", overwrite=True, parent_created=True)


def check_sweep_inputs(sweep, job, address: str | None) -> None:
    """What `check_job_inputs` checks of a job, for a sweep's base job, plus the sweep's own output folder and prior
    store; before the sweep writes anything or starts Ray."""
    from rayeff.models import resolve_model

    check_tracking(sweep.tracking, sweep.output_dir)
    check_output_location(sweep.output_dir)
    check_prior_store(sweep.priors.store)
    check_cache_dir(job.data.cache_dir)
    source = resolve_model(job.model.name)
    check_model_folder(source)
    check_model_suits_task(job, source)
    check_sequence_length(job, source)
    check_local_gpus(job, address)
