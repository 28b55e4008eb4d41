"""Job specs: validated data that flows from a YAML file (plus `--set` overrides) into the runner and the workers.

    rayeff run jobs/sst2-read.yaml --set training.lr=3e-4 --set scaling.num_workers=2

A job is plain data; `JobSpec.model_dump()` is what travels to every Ray Train worker, which validates it again.
Every way a file can be wrong ends in `UserError` with the file and the field named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from rayeff.errors import UserError
from rayeff.methods import METHODS, MethodConfig, get_method, method_config_from_dict
from rayeff.spec_base import Spec, no_nul


class ModelSpec(Spec):
    name: str = Field("minilm-l6", description="alias (minilm-l6, tiny-bert, tiny-t5, tiny-gpt2, tiny-llama), "
                                               "a local model folder, or a hub model id")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="overrides every dropout of backbone and head")
    pooling: Literal["auto", "first", "last", "mean"] = Field(
        "auto", description="which token states the head reads: auto is first for encoders (CLS), last real token "
                            "for decoders, the decoder's state for encoder-decoders; mean averages real tokens")
    head: Literal["mlp", "linear"] = Field(
        "mlp", description="mlp: dense -> tanh -> out (RoBERTa's head); linear: one projection to the labels "
                           "(few parameters, which zeroth-order training estimates far better)")

    _paths = field_validator("name")(no_nul)


class DataSpec(Spec):
    """A GLUE preset (`task`), or the user's own examples: files (`train_file`, with `dev_file` or `dev_fraction`) or
    a dataset `datasets.load_dataset` reads (`dataset`, with `dev_split` or `dev_fraction`)."""
    task: str | None = Field(None, description="GLUE preset: cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, "
                                               "wnli; leave it out when the data is your own (train_file)")
    data_dir: str | None = Field(None, description="folder in GLUE's download layout; None loads from the hub")
    train_file: str | None = Field(None, description="your training examples: a .jsonl, .json, .csv, .tsv or "
                                                     ".parquet file, or a folder saved by datasets' save_to_disk")
    dev_file: str | None = Field(None, description="your dev examples, in the same forms as train_file")
    dataset: str | None = Field(None, description="instead of train_file: a dataset datasets.load_dataset reads, a "
                                                  "hub id (e.g. stanfordnlp/imdb; needs the hub) or a local folder "
                                                  "of data files")
    dataset_config: str | None = Field(None, description="the dataset's configuration (subset) name, if it has some")
    train_split: str = Field("train", description="the dataset's split to train on")
    dev_split: str | None = Field(None, description="the dataset's split to evaluate on (e.g. validation); or "
                                                    "dev_fraction of train_split")
    dev_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="without dev_file: hold out this fraction "
                                                                         "of train_file as dev, drawn with `seed`")
    task_type: Literal["classification", "regression", "causal_lm", "prompted_classification"] = Field(
        "classification", description="what the model learns: a label from a set, a number, (causal_lm) to write "
                                      "the response to a prompt, its loss on the response only, or "
                                      "(prompted_classification) a label scored by the LM head's logits of its "
                                      "label words after a prompt (MeZO's, LM-BFF's setting); a GLUE preset takes "
                                      "classification (its own) or prompted_classification")
    columns: dict[str, str] = Field(default_factory=dict, description="your data's column for each role: text, "
                                    "text_pair (optional), label for classification and regression; prompt, "
                                    "response, or messages (OpenAI chat format) for causal_lm. e.g. {text: sentence, "
                                    "label: label}. Roles left out "
                                    "read the column of the role's own name")
    chat_template: str | None = Field(None, description="causal_lm on chat `messages`: a Jinja chat template (as "
                                      "tokenizer_config.json holds one); default: the tokenizer's own")
    eval_max_new_tokens: int | None = Field(None, gt=0, description="causal_lm: also generate (greedy) up to this "
                                            "many tokens for each dev prompt and score them against its response: "
                                            "exact_match and token_f1, as SQuAD defines them")
    packing: bool = Field(False, description="causal_lm: pack short train examples into rows of up to "
                          "training.max_seq_length tokens (whole examples, in order); each attends only to itself "
                          "(positions restart per example), so fewer, fuller batches learn the same")
    eval_temperature: float = Field(0.0, ge=0.0, description="causal_lm generation on dev: 0 decodes greedily; above "
                                    "0, tokens are sampled at this temperature, seeded by training.seed and each "
                                    "prompt (the same answers on any number of workers)")
    eval_top_p: float = Field(1.0, gt=0.0, le=1.0, description="sampling: keep the smallest set of tokens whose "
                              "probability reaches top_p (nucleus sampling)")
    eval_top_k: int | None = Field(None, gt=0, description="sampling: keep the k most likely tokens")
    template: str | None = Field(None, description="causal_lm: the prompt built from each example's columns, e.g. "
                                 "'Question: {question}\\nAnswer: ' (default: the prompt column as it is); "
                                 "prompted_classification: the prompt, {mask} where the label word goes, e.g. "
                                 "'{sentence} It was {mask}.' (a decoder predicts it next, so {mask} ends the "
                                 "template); {text} and {text_pair} name the mapped columns")
    label_words: dict[str, str | list[str]] | None = Field(
        None, description="prompted_classification: each label's word (or words, whose probabilities add up), one "
                          "token each, e.g. {negative: terrible, positive: great}; in a BPE vocabulary (GPT-2, "
                          "Llama, RoBERTa) a word after a space usually starts with one (' great')")
    labels: list[str] | None = Field(None, min_length=2, description="the label set in the order of the model's "
                                     "outputs; None takes the train split's labels, sorted (numerically when all "
                                     "are integers)")
    name: str | None = Field(None, description="your data's name in results (default: train_file's stem)")
    train_subset: int | None = Field(None, gt=0, description="train on this many examples, drawn with `seed`")
    k_shot: int | None = Field(None, gt=0, description="train on k examples per class, drawn with `seed`")
    eval_subset: int | None = Field(None, gt=0, description="evaluate on the first n dev examples only")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the subset, k-shot and held-out draws (fixed apart "
                                                     "from training.seed)")
    cache_dir: str | None = Field(None, description="tokenised-dataset cache; default ~/.cache/rayeff")

    _paths = field_validator("data_dir", "cache_dir", "train_file", "dev_file", "dataset")(no_nul)

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str | None) -> str | None:
        from rayeff.data.glue import canonical_task_name

        return None if task is None else canonical_task_name(task)

    @field_validator("label_words", mode="before")
    @classmethod
    def _labels_as_text(cls, words):
        """YAML reads a label 1 as a number and true as a boolean; labels are names (see data/task.py)."""
        if isinstance(words, dict):
            return {(str(k).lower() if isinstance(k, bool) else str(k)): v for k, v in words.items()}
        return words

    @field_validator("columns")
    @classmethod
    def _known_roles(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(COLUMN_ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {unknown}; the roles are {', '.join(COLUMN_ROLES)}")
        return columns

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.train_subset is not None and self.k_shot is not None:
            raise ValueError("set either train_subset or k_shot, not both")
        if self.packing and self.task_type != "causal_lm":
            raise ValueError("packing packs causal_lm examples; set task_type: causal_lm or leave packing out")
        for field in ("chat_template", "eval_max_new_tokens"):
            if getattr(self, field) is not None and self.task_type != "causal_lm":
                raise ValueError(f"{field} is for causal_lm data; set task_type: causal_lm or leave {field} out")
        sampling = [f for f in ("eval_temperature", "eval_top_p", "eval_top_k")
                    if getattr(self, f) != DataSpec.model_fields[f].default]
        if sampling and self.eval_max_new_tokens is None:
            raise ValueError(f"{sampling[0]} shapes dev generation; set eval_max_new_tokens too, or leave it out")
        if sampling and self.eval_temperature == 0.0:
            raise ValueError(f"{sampling[0]} shapes sampling; set eval_temperature above 0 (0 decodes greedily)")
        prompted = self.task_type == "prompted_classification"
        if self.template is not None and self.task_type not in ("causal_lm", "prompted_classification"):
            raise ValueError("template is for causal_lm and prompted_classification data; set task_type or leave "
                             "template out")
        if (self.label_words is not None) != prompted:
            raise ValueError("prompted_classification scores labels by their words: set label_words (e.g. "
                             "{negative: terrible, positive: great})" if prompted else
                             "label_words are for prompted_classification; set task_type: prompted_classification "
                             "or leave label_words out")
        if prompted and self.template is None:
            raise ValueError("prompted_classification turns each example into a prompt: set template (e.g. "
                             "'{text} It was {mask}.')")
        sources = [f for f in ("task", "train_file", "dataset") if getattr(self, f) is not None]
        if len(sources) != 1:
            raise ValueError(f"set one of task (a GLUE preset such as sst2), train_file (your own file) or dataset "
                             f"(a hub id or dataset folder), not {' and '.join(sources)}" if sources else
                             "set task (a GLUE preset such as sst2), train_file (your own file) or dataset (a hub id "
                             "or dataset folder)")
        if self.dataset is None and (self.dataset_config or self.dev_split or self.train_split != "train"):
            raise ValueError("dataset_config, train_split and dev_split name parts of a dataset; set dataset, or "
                             "leave them out")
        if self.task is not None:
            own = [f for f in ("dev_file", "dev_fraction", "columns", "labels", "name", "chat_template")
                   if getattr(self, f)] + (["task_type"] if self.task_type in ("causal_lm", "regression") else [])
            if own:
                raise ValueError(f"{', '.join(own)} describe your own data (train_file); a GLUE preset (task) "
                                 "has its own")
            return self
        if self.data_dir is not None:
            raise ValueError("data_dir (from the job or --data-dir) is GLUE's folder; this job trains on its own "
                             "data: leave it out, and give dev_file, dev_split or dev_fraction for its dev set")
        dev, where = ("dev_split", "train_split") if self.dataset else ("dev_file", "train_file")
        if self.dataset and self.dev_file:
            raise ValueError("dev_file goes with train_file; a dataset's dev examples are its dev_split")
        if (getattr(self, dev) is None) == (self.dev_fraction is None):
            raise ValueError(f"with {where}, set {dev} or dev_fraction (a held-out share of {where}), not both"
                             if getattr(self, dev) else f"with {where}, set {dev} or dev_fraction (a held-out "
                             f"share of {where}, e.g. 0.1)")
        if self.task_type not in ("classification", "prompted_classification") and self.labels is not None:
            raise ValueError(f"labels name classes; a {self.task_type} task has none")
        if self.task_type == "causal_lm" and self.k_shot is not None:
            raise ValueError("k_shot draws k examples per class; a causal_lm task has none (use train_subset)")
        return self

    def resolve_paths(self) -> None:
        """The data's paths made absolute, as the driver sees them: the workers may start in another folder."""
        for field in ("data_dir", "train_file", "dev_file"):
            if getattr(self, field) is not None:
                setattr(self, field, str(Path(getattr(self, field)).resolve()))
        if self.dataset is not None and Path(self.dataset).expanduser().is_dir():   # a local folder, not a hub id
            self.dataset = str(Path(self.dataset).expanduser().resolve())

    @property
    def own(self) -> bool:
        """The user's own examples (a file or a dataset) rather than a GLUE preset."""
        return self.task is None

    @property
    def display_name(self) -> str:
        """The data's name in results: the GLUE task, or data.name, or train_file's stem, or the dataset's name."""
        if self.task is not None:
            return self.task
        return self.name or Path((self.train_file or self.dataset).rstrip("/")).stem or "data"


COLUMN_ROLES = ("text", "text_pair", "label", "prompt", "response", "messages")


class TrainingSpec(Spec):
    epochs: float | None = Field(None, gt=0, description="passes over the training set (default 1)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(32, gt=0, description="global batch size, split evenly over the workers")
    lr: float = Field(5e-5, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, lt=2**32, description="seed of weights, data order and dropout (zeroth-order "
                                                      "methods: below 2**23, see rayeff/train/spsa.py)")
    max_seq_length: int = Field(128, gt=0)
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="pad each batch to its longest example, or always to max_seq_length")
    eval_every: int | None = Field(None, gt=0, description="evaluate on dev every N steps (and always at the end)")
    log_every: int = Field(10, gt=0, description="report loss, throughput and energy every N steps")
    checkpoint_every: int | None = Field(None, gt=0, description="checkpoint every N steps (and at the end)")


class ScalingSpec(Spec):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="0 trains on CPUs over gloo; >0 on GPUs over NCCL")
    threads_per_worker: int | None = Field(None, gt=0, description="torch intra-op threads of each worker; "
                                                                   "None leaves Ray's default")


class DeepSpeedSpec(Spec):
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = Field(False, description="keep optimizer state on the CPU (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters on the CPU (ZeRO 3)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSpec:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class EnergySpec(Spec):
    meter: Literal["auto", "nvml", "rapl", "estimate"] = Field(
        "auto", description="auto: NVML on GPUs, else RAPL where readable, else the labelled CPU-time estimate")
    budget_j: float | None = Field(None, gt=0, description="stop the run (checkpointed, resumable) past this")
    watts_per_cpu: float = Field(10.0, gt=0, description="power per busy core used by the `estimate` meter")


class FailureSpec(Spec):
    max_failures: int = Field(0, ge=-1, description="times the worker group restarts from the last checkpoint when "
                              "a worker dies (-1: no limit); Ray Train's FailureConfig")


MLFLOW_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql://", "mysql://", "mssql://", "databricks")


class TrackingSpec(Spec):
    """Where rank 0 sends the run's settings, progress and results (rayeff/tracking.py)."""

    mlflow: bool | str | None = Field(None, description="an MLflow tracking URI (http://host:port, sqlite:///FILE, "
                                      "a database URL, databricks), or true: a SQLite store OUTPUT/mlflow.db")
    tensorboard: bool | str | None = Field(None, description="a folder for TensorBoard event files (relative: under "
                                           "the output folder), or true: OUTPUT/tensorboard")
    experiment: str = Field("rayeff", min_length=1, description="the MLflow experiment the run is logged in")
    parent_run_id: str | None = Field(None, description="the MLflow run this one nests under (a sweep sets it for "
                                      "its trials)")

    @field_validator("mlflow")
    @classmethod
    def _mlflow_uri(cls, value: bool | str | None) -> bool | str | None:
        if isinstance(value, str) and not value.startswith(MLFLOW_SCHEMES):
            hint = " (MLflow 3 refuses file stores: use sqlite:///PATH.db)" if value.startswith(("file:", "/", ".")) \
                else ""
            raise ValueError(f"{value!r} is not an MLflow tracking URI{hint}; give http://HOST:PORT, "
                             "sqlite:///PATH.db, a database URL, databricks, or true")
        return value

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_folder(cls, value: bool | str | None) -> bool | str | None:
        return no_nul(value) if isinstance(value, str) else value

    @property
    def enabled(self) -> bool:
        return bool(self.mlflow) or bool(self.tensorboard)


class JobSpec(Spec):
    model: ModelSpec = ModelSpec()
    data: DataSpec
    method: SerializeAsAny[MethodConfig]
    training: TrainingSpec = TrainingSpec()
    scaling: ScalingSpec = ScalingSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    energy: EnergySpec = EnergySpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    output_dir: str = Field("runs/job", description="where result.json, checkpoints and final weights go")
    resume: bool = Field(False, description="continue from the checkpoint in output_dir")

    _paths = field_validator("output_dir")(no_nul)

    @field_validator("method", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> MethodConfig:
        if isinstance(value, MethodConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a mapping with at least `name`")
        return method_config_from_dict(value)

    @model_validator(mode="after")
    def _suits_the_method(self) -> JobSpec:
        method = get_method(self.method.name)
        if method.loop == "first_order" and self.training.batch_size % self.scaling.num_workers:
            raise ValueError(f"training.batch_size ({self.training.batch_size}) must be a multiple of "
                             f"scaling.num_workers ({self.scaling.num_workers})")
        if self.data.task_type not in method.task_types:
            raise ValueError(f"method {method.name} cannot train a {self.data.task_type} task (data.task_type) yet; "
                             f"it trains {', '.join(method.task_types)}. For {self.data.task_type}, use "
                             f"{', '.join(sorted(m for m in METHODS if self.data.task_type in METHODS[m].task_types))}")
        if method.check_job is not None:
            method.check_job(self.method, self)
        return self

    def micro_batch_size(self) -> int:
        """Examples per worker per forward: the global batch split over workers (for evaluation too, rounded up)."""
        return -(-self.training.batch_size // self.scaling.num_workers)


def describe_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def set_field(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: `{key}` is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`training.lr=3e-4` -> ("training.lr", 0.0003); values are read as YAML scalars."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected FIELD=VALUE, e.g. --set training.lr=3e-4")
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def validate_job(raw: dict, source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"{source}: {describe_errors(err)}") from None


def read_yaml_mapping(path: str | Path, kind: str, shape: str) -> dict:
    """A YAML file that must hold a mapping; `kind` names the file in errors (`job`, `sweep`...), `shape` says
    what the mapping holds. Every failure is a one-line `UserError`."""
    from rayeff.checks import read_text_file

    path = Path(path)
    text = read_text_file(path, f"{kind} file")   # exists, a file, readable, UTF-8 (a byte-order mark is fine)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a {kind} file must be a YAML mapping with {shape}")
    return raw


def load_job(path: str | Path, overrides: list[str] | tuple = ()) -> JobSpec:
    """Read, override and validate a job file; every failure is a one-line `UserError`."""
    raw = read_yaml_mapping(path, "job", "`data` and `method` sections")
    for key, value in parse_overrides(list(overrides)):
        set_field(raw, key, value)
    return validate_job(raw, str(path))
