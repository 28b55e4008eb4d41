"""READ (REcurrent ADaption, arXiv 2305.15348): a frozen backbone run once without autograd, and a small recurrent
side network over the layer index that corrects the backbone's final state.

    u_i = g_i * s_in * P(Norm(x_i))        x_i: backbone state after layer i, for the selected layers i (default all
                                           L); P: identity (`input_projection: scale`) or a learned d -> r map
                                           (`linear`); g_i: 1, or a learned per-layer gate (`layer_gates`)
    h_1..h_L = RNN(u_1..u_L; h_0)          RNN: GRU (default), RNN or LSTM of state size r; one or more stacked
                                           layers, one direction or both; h_0 = 0 or W_0 (s_in Norm(x_0))
                                           (`initial_state`)
    delta = s_out * W_o(agg(h_1..h_L))     agg: mean (default) or last (both directions' final states); W_o starts at 0
    final = x_L + delta -> head

With `model.pooling: mean`, `attention_pooling` weighs each real token t by exp(v . agg h_t) instead of equally
(v starts at zero, so step 0 is exactly the mean): the one place where READ's tokens meet, learned from the side
network's per-token summaries, still without a gradient into the backbone.

Trainable parameters per stack (D directions, K recurrent layers, g = 1 RNN, 3 GRU, 4 LSTM, i = d, or r with P):
Norm d, P r d, gates (one per selected layer), W_0 (d r + r), recurrence D g (i r + r^2 + 2r) for the first
layer and D g (D r r + r^2 + 2r) for each further one, W_o (D r d + d), v (D r). With the defaults: g(d r + r^2 + 2r) +
(r d + d) + d, as the paper counts it, independent of the depth.

The recurrence is per token and tokens do not interact in it, and pooling and W_o are linear, so
pool(x_L + delta) = pool(x_L) + s_out * W_o(pool(agg h)). When the head reads one position (first or last token)
the recurrence runs at that position only: the logits equal those of correcting every token, at a fraction of the
cost. With mean pooling it runs at every real (unpadded) token and its summaries are averaged before W_o.
Encoder-decoder backbones (T5) get a side network per stack: the encoder-side one runs over every encoder token,
its mean state goes through a joiner into h_0 of the decoder-side one, which makes the correction. No gradient
ever enters a backbone layer.

    rayeff run jobs/sst2-read.yaml --data-dir ../shared/data/glue
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rayeff.errors import UserError
from rayeff.methods.registry import EVERY_TASK_TYPE, MethodConfig, MethodDefinition, register_method
from rayeff.models import CausalLM, SequenceClassifier, hidden_size

RECURRENCES = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
GATES_PER_UNIT = {"rnn": 1, "gru": 3, "lstm": 4}


class ReadConfig(MethodConfig):
    name: Literal["read"] = "read"
    hidden_size: int = Field(64, gt=0, description="r, the side network's state size")
    rnn: Literal["gru", "rnn", "lstm"] = "gru"
    recurrent_layers: int = Field(1, ge=1, le=4, description="recurrent layers stacked in the side network")
    bidirectional: bool = Field(False, description="also run the recurrence from the last backbone layer down; "
                                                   "W_o reads both directions")
    aggregation: Literal["mean", "last"] = "mean"
    input_projection: Literal["scale", "linear"] = Field(
        "scale", description="scale: the recurrence reads s_in Norm(x_i) (width d); linear: s_in times a learned "
                             "d -> r projection of Norm(x_i) (width r)")
    layer_gates: bool = Field(False, description="a learned scale per fed layer on its input, starting at 1")
    layers: Literal["all", "top_half"] = Field("all", description="the backbone layers that feed the recurrence")
    layer_stride: int = Field(1, gt=0, description="feed every k-th of those layers, counting down from the last "
                                                  "(which always feeds it)")
    initial_state: Literal["zero", "embeddings"] = Field(
        "zero", description="h_0: zero, or a learned projection of Norm(x_0), the embedding output")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the side network's inputs and between its "
                                                        "recurrent layers (training only)")
    attention_pooling: bool = Field(False, description="with model.pooling: mean, weigh the tokens by a learned "
                                                       "score of their side-network summary (starting equal)")
    s_in: float = Field(1.0, gt=0, description="scale of the normalised backbone states fed to the recurrence")
    s_out: float = Field(1.0, gt=0, description="scale of the correction added to the final state")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


def check_job(config: ReadConfig, job) -> None:
    """The job rules of method read (its MethodDefinition's `check_job`)."""
    if config.attention_pooling and job.model.pooling != "mean":
        raise ValueError("method.attention_pooling: it reweighs the mean over tokens; set model.pooling: mean "
                         "(the pooling sentence-transformers checkpoints such as MiniLM were trained with)")


class LayerGates(nn.Module):
    """A learned scale per fed layer (starting at 1) on the recurrence's inputs (fed layers, N, width). A module of
    its own so that ZeRO-3 gathers it when it runs, as it does every other part."""

    def __init__(self, count: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(count))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.scale[:, None, None] * u


def _renamed_legacy_cell(_module, state_dict, prefix, *_args) -> None:
    """Checkpoints written before the recurrence was torch's nn.GRU/LSTM/RNN hold its one layer as `cell.*` (an
    nn.GRUCell's names): the same tensors, under the names of the first layer."""
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if f"{prefix}cell.{name}" in state_dict:
            state_dict[f"{prefix}rnn.{name}_l0"] = state_dict.pop(f"{prefix}cell.{name}")


def fed_layers(config: ReadConfig, depth: int) -> list[int]:
    """The backbone layers (1..depth) whose states feed the recurrence, in order."""
    lowest = depth // 2 + 1 if config.layers == "top_half" else 1
    return sorted(range(depth, lowest - 1, -config.layer_stride))


class SideNetwork(nn.Module):
    """Recurrence over layers: the states of the fed layers, each (N, d) -> (N, d) correction, or an (N, D r)
    summary without `W_o`."""

    def __init__(self, width: int, depth: int, config: ReadConfig, with_output: bool = True):
        super().__init__()
        self.config = config
        r, directions = config.hidden_size, config.directions
        self.depth, self.layers = depth, fed_layers(config, depth)
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.project = nn.Linear(width, r, bias=False) if config.input_projection == "linear" else None
        self.gates = LayerGates(len(self.layers)) if config.layer_gates else None
        self.initial = nn.Linear(width, r) if config.initial_state == "embeddings" else None
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = RECURRENCES[config.rnn](r if self.project is not None else width, r,
                                           num_layers=config.recurrent_layers, bidirectional=config.bidirectional,
                                           dropout=config.dropout if config.recurrent_layers > 1 else 0.0)
        self.out = nn.Linear(directions * r, width) if with_output else None
        if self.out is not None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.register_load_state_dict_pre_hook(_renamed_legacy_cell)

    @property
    def reads_embeddings(self) -> bool:
        return self.initial is not None

    def inputs(self, hidden_states) -> list[int]:
        """Which of hidden_states (x_0 = embeddings, x_1..x_L) this network reads: x_0 for h_0, then the fed layers."""
        if len(hidden_states) != self.depth + 1:   # a model whose config names another depth than it runs
            raise ValueError(f"READ: the backbone returned {len(hidden_states) - 1} layer states; its config says "
                             f"{self.depth}")
        return ([0] if self.reads_embeddings else []) + self.layers

    def summary(self, states: list[torch.Tensor], h0: torch.Tensor | None = None) -> torch.Tensor:
        """agg(h) over `states`, each (N, d): x_0 first when the network reads it, then the fed layers' x_i.
        `h0` (N, r), if given, is added to the initial state of every recurrent layer and direction."""
        dtype = self.norm.weight.dtype
        if self.reads_embeddings:
            made = self.initial(self.config.s_in * self.norm(states[0].to(dtype)))
            h0, states = made if h0 is None else h0 + made, states[1:]
        u = self.config.s_in * self.norm(torch.stack(states).to(dtype))   # (fed layers, N, d)
        if self.project is not None:
            u = self.project(u)
        if self.gates is not None:
            u = self.gates(u)
        output, final = self.rnn(self.dropout(u), self._initial_state(h0))
        if self.config.aggregation == "mean":
            return output.mean(0)
        last = (final[0] if self.config.rnn == "lstm" else final)[-self.config.directions:]   # top layer's h
        return last.transpose(0, 1).reshape(last.shape[1], -1)           # (N, D r): forward, then backward

    def _initial_state(self, h0: torch.Tensor | None):
        if h0 is None:
            return None   # zeros
        h = h0.unsqueeze(0).expand(self.rnn.num_layers * self.config.directions, -1, -1).contiguous()
        return (h, torch.zeros_like(h)) if self.config.rnn == "lstm" else h

    def correction(self, summary: torch.Tensor) -> torch.Tensor:
        return self.config.s_out * self.out(summary)


def _layer_count(config, names: tuple[str, ...]) -> int:
    for name in names:
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise UserError(f"model: cannot read the number of layers from a {config.model_type} config (none of "
                    f"{', '.join(names)}), which READ's side network needs")


def stack_depths(config) -> tuple[int, int | None]:
    """Layers of the (decoder or only) stack whose state the head reads, and of an encoder-decoder's encoder
    (T5 names them num_decoder_layers / num_layers, BART and its kin decoder_layers / encoder_layers)."""
    if getattr(config, "is_encoder_decoder", False):
        return (_layer_count(config, ("num_decoder_layers", "decoder_layers")),
                _layer_count(config, ("num_layers", "encoder_layers")))
    return _layer_count(config, ("num_hidden_layers",)), None


class ReadModel(nn.Module):
    """Frozen classifier backbone + side network(s); the head and side networks train."""

    def __init__(self, classifier: SequenceClassifier, config: ReadConfig):
        super().__init__()
        self.classifier = classifier
        classifier.freeze_backbone()
        width = hidden_size(classifier.backbone.config)
        depth, encoder_depth = stack_depths(classifier.backbone.config)
        self.side = SideNetwork(width, depth, config)
        self.encoder_side = self.joiner = None
        if classifier.kind == "encoder-decoder":
            self.encoder_side = SideNetwork(width, encoder_depth, config, with_output=False)
            self.joiner = nn.Linear(config.directions * config.hidden_size, config.hidden_size)
        self.token_scores = None
        if config.attention_pooling:
            if classifier.pooling != "mean" or isinstance(classifier, CausalLM):
                raise ValueError("READ's attention_pooling reweighs a mean over tokens: it needs a classifier "
                                 "with model.pooling: mean")
            self.token_scores = nn.Linear(config.directions * config.hidden_size, 1, bias=False)
            nn.init.zeros_(self.token_scores.weight)   # every token weighs 1: the mean, exactly

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.backbone.eval()  # frozen: its dropout stays off, as in inference
        return self

    def _decoder_h0(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = out.encoder_hidden_states
        b, t, d = enc[0].shape
        per_token = self.encoder_side.summary([enc[i].reshape(b * t, d) for i in self.encoder_side.inputs(enc)])
        per_token = per_token.reshape(b, t, -1)
        mask = attention_mask.unsqueeze(-1).to(per_token.dtype)
        return self.joiner((per_token * mask).sum(1) / mask.sum(1).clamp(min=1))

    def _mean_over_real_tokens(self, hidden_states, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side-network summaries averaged over each sequence's real tokens (padding never enters the recurrence),
        and the tokens' weights (batch, tokens): the attention mask, or with attention pooling exp(v . h_t - the
        sequence's largest), so that the largest weighs 1 and a zero v gives the mask itself."""
        real = attention_mask.bool()
        per_token = self.side.summary([hidden_states[i][real] for i in self.side.inputs(hidden_states)])
        sequence, position = real.nonzero().unbind(1)
        weights = attention_mask.to(per_token.dtype)
        if self.token_scores is not None:
            scores = self.token_scores(per_token).squeeze(1)
            top = scores.new_full((real.shape[0],), -torch.inf).scatter_reduce(0, sequence, scores, "amax")
            weights = torch.zeros_like(weights).index_put((sequence, position),
                                                          torch.exp(scores - top[sequence]))
            per_token = per_token * weights[real].unsqueeze(1)
        total = per_token.new_zeros(real.shape[0], per_token.shape[1]).index_add(0, sequence, per_token)
        return total / weights.sum(1, keepdim=True).clamp(min=1), weights

    def _every_token_corrected(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """A causal LM's head reads every position: each real token's final state gets its own correction, from
        the side network's run over that token's states across the layers; padding is left as it is."""
        real = attention_mask.bool()
        states = out.hidden_states
        per_token = self.side.correction(self.side.summary([states[i][real] for i in self.side.inputs(states)]))
        final = out.last_hidden_state
        correction = final.new_zeros(final.shape)
        correction[real] = per_token.to(final.dtype)
        return self.classifier.head(final + correction)

    def forward(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, **_unused) -> torch.Tensor:
        clf = self.classifier
        packed = {} if position_ids is None else {"position_ids": position_ids}   # packed causal-LM rows
        with torch.no_grad():  # the backbone runs once, building no graph: nothing saved, no gradient
            out = clf.run_backbone(input_ids, attention_mask, token_type_ids, output_hidden_states=True, **packed)
        if isinstance(clf, CausalLM):
            return self._every_token_corrected(out, attention_mask)
        if clf.kind == "encoder-decoder":
            states, h0 = out.decoder_hidden_states, self._decoder_h0(out, attention_mask)
        else:
            states, h0 = out.hidden_states, None
        if clf.pooling == "mean":
            summary, weights = self._mean_over_real_tokens(states, attention_mask)
            # the same weighted mean of the final states (with the mask as weights: what clf.pool computes)
            final = clf.pool(out.last_hidden_state, weights, input_ids)
        else:
            summary = self.side.summary([clf.pool(states[i], attention_mask, input_ids)
                                         for i in self.side.inputs(states)], h0)
            final = clf.pool(out.last_hidden_state, attention_mask, input_ids)
        return clf.head(final + self.side.correction(summary).to(final.dtype))


def side_parameter_formula(width: int, config: ReadConfig, depth: int, with_output: bool = True) -> int:
    """The module docstring's count for one stack of `depth` layers (METHODS.md's with the defaults)."""
    r, directions, g = config.hidden_size, config.directions, GATES_PER_UNIT[config.rnn]
    first_input = r if config.input_projection == "linear" else width
    count = width + (r * width if config.input_projection == "linear" else 0)
    count += len(fed_layers(config, depth)) if config.layer_gates else 0
    count += width * r + r if config.initial_state == "embeddings" else 0
    count += directions * g * (first_input * r + r * r + 2 * r)
    count += (config.recurrent_layers - 1) * directions * g * (directions * r * r + r * r + 2 * r)
    count += directions * r if config.attention_pooling and with_output else 0
    return count + (directions * r * width + width if with_output else 0)


def build(classifier: SequenceClassifier, config: ReadConfig) -> nn.Module:
    return ReadModel(classifier, config)


register_method(MethodDefinition("read", ReadConfig, build, loop="first_order", check_job=check_job,
                                 task_types=EVERY_TASK_TYPE, backward_through_backbone=False))
