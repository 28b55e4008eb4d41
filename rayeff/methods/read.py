"""READ (REcurrent ADaption, arXiv 2305.15348): a frozen backbone run once without autograd, and a small recurrent
side network over the layer index that corrects the backbone's final state.

    u_i = s_in * Norm(x_i)                  x_i: backbone state after layer i (i = 1..L), Norm shared
    h_i = Cell(u_i, h_{i-1}), h_0 = 0       Cell: GRU (default), RNN or LSTM, hidden size r
    delta = s_out * W_o(agg(h_1..h_L))      agg: mean (default) or last; W_o starts at zero
    final = x_L + delta -> head

Trainable parameters per stack: g(d r + r^2 + 2r) + (r d + d) + d, g = 1 (RNN), 3 (GRU), 4 (LSTM).

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

from rayeff.methods.registry import EVERY_TASK_TYPE, MethodConfig, MethodDefinition, register_method
from rayeff.models import CausalLM, SequenceClassifier, hidden_size

CELLS = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}


class ReadConfig(MethodConfig):
    name: Literal["read"] = "read"
    hidden_size: int = Field(64, gt=0, description="r, the side network's state size")
    rnn: Literal["gru", "rnn", "lstm"] = "gru"
    aggregation: Literal["mean", "last"] = "mean"
    s_in: float = Field(1.0, gt=0, description="scale of the normalised backbone states fed to the cell")
    s_out: float = Field(1.0, gt=0, description="scale of the correction added to the final state")


class SideNetwork(nn.Module):
    """Recurrence over layers: (L, N, d) states -> (N, d) correction, or (N, r) summary without `W_o`."""

    def __init__(self, width: int, config: ReadConfig, with_output: bool = True):
        super().__init__()
        self.config = config
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.cell = CELLS[config.rnn](width, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, width) if with_output else None
        if self.out is not None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def summary(self, states: list[torch.Tensor], h0: torch.Tensor | None = None) -> torch.Tensor:
        """agg(h_1..h_L) for states x_1..x_L, each (N, d)."""
        n, dtype = states[0].shape[0], self.cell.weight_ih.dtype
        h = torch.zeros(n, self.config.hidden_size, dtype=dtype, device=states[0].device) if h0 is None else h0
        carry = (h, torch.zeros_like(h)) if self.config.rnn == "lstm" else h
        total = torch.zeros_like(h)
        for x in states:
            carry = self.cell(self.config.s_in * self.norm(x.to(dtype)), carry)
            h = carry[0] if self.config.rnn == "lstm" else carry
            total = total + h
        return total / len(states) if self.config.aggregation == "mean" else h

    def correction(self, summary: torch.Tensor) -> torch.Tensor:
        return self.config.s_out * self.out(summary)


class ReadModel(nn.Module):
    """Frozen classifier backbone + side network(s); the head and side networks train."""

    def __init__(self, classifier: SequenceClassifier, config: ReadConfig):
        super().__init__()
        self.classifier = classifier
        classifier.freeze_backbone()
        width = hidden_size(classifier.backbone.config)
        self.side = SideNetwork(width, config)
        self.encoder_side = self.joiner = None
        if classifier.kind == "encoder-decoder":
            self.encoder_side = SideNetwork(width, config, with_output=False)
            self.joiner = nn.Linear(config.hidden_size, config.hidden_size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.backbone.eval()  # frozen: its dropout stays off, as in inference
        return self

    def _decoder_h0(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = out.encoder_hidden_states[1:]
        b, t, d = enc[0].shape
        per_token = self.encoder_side.summary([x.reshape(b * t, d) for x in enc]).reshape(b, t, -1)
        mask = attention_mask.unsqueeze(-1).to(per_token.dtype)
        return self.joiner((per_token * mask).sum(1) / mask.sum(1).clamp(min=1))

    def _mean_over_real_tokens(self, layers, attention_mask: torch.Tensor) -> torch.Tensor:
        """Side-network summaries averaged over each sequence's real tokens; padding never enters the recurrence."""
        real = attention_mask.bool()
        per_token = self.side.summary([x[real] for x in layers])            # (real tokens, r)
        sequence = real.nonzero()[:, 0]
        total = per_token.new_zeros(real.shape[0], per_token.shape[1]).index_add(0, sequence, per_token)
        return total / real.sum(1, keepdim=True).to(total.dtype).clamp(min=1)

    def _every_token_corrected(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """A causal LM's head reads every position: each real token's final state gets its own correction, from
        the side network's run over that token's states across the layers; padding is left as it is."""
        real = attention_mask.bool()
        per_token = self.side.correction(self.side.summary([x[real] for x in out.hidden_states[1:]]))
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
            layers, h0 = out.decoder_hidden_states[1:], self._decoder_h0(out, attention_mask)
        else:
            layers, h0 = out.hidden_states[1:], None
        if clf.pooling == "mean":
            summary = self._mean_over_real_tokens(layers, attention_mask)
        else:
            summary = self.side.summary([clf.pool(x, attention_mask, input_ids) for x in layers], h0)
        final = clf.pool(out.last_hidden_state, attention_mask, input_ids)
        return clf.head(final + self.side.correction(summary).to(final.dtype))


def side_parameter_formula(width: int, r: int, rnn: str) -> int:
    """METHODS.md's count for one stack: g(d r + r^2 + 2r) + (r d + d) + d."""
    g = {"rnn": 1, "gru": 3, "lstm": 4}[rnn]
    return g * (width * r + r * r + 2 * r) + (r * width + width) + width


def build(classifier: SequenceClassifier, config: ReadConfig) -> nn.Module:
    return ReadModel(classifier, config)


register_method(MethodDefinition("read", ReadConfig, build, loop="first_order",
                                 task_types=EVERY_TASK_TYPE))
