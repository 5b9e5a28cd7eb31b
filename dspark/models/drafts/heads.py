"""The sequential heads of a DSpark draft: Markov transition variants and the confidence head.

Parameter names follow DeepSpec's release (`markov_head.markov_w1.weight`,
`markov_head.markov_w2.weight`, `confidence_head.proj.weight/bias`).
Paper §3.1 (Eq. 4-6) and §3.2.1 (Eq. 7).
"""
from typing import Optional

import torch
from torch import nn

from ... import ops
from ..layers import Linear


class VanillaMarkovHead(nn.Module):
    """B(x_{k-1}, .) = W1[x_{k-1}] W2: a rank-r first-order transition (Eq. 5)."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, output_size: Optional[int] = None):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)                       # weight [V, r], by previous token
        self.markov_w2 = Linear(rank, output_size or vocab_size, bias=False)  # weight [Vd, r], the draft vocabulary

    def prev_embeddings(self, prev_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_w1(prev_ids)                              # [..., r]

    def transition(self, hidden: torch.Tensor) -> ops.draft.Transition:
        """A step function for `ops.sample_draft_block`; hidden: [R, gamma, d]."""
        del hidden
        return lambda k, prev_ids, state: (ops.markov_bias(prev_ids, self.markov_w1.weight, self.markov_w2.weight),
                                           None)

    def block_bias(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced biases for a whole block: [..., gamma, V] (training and scoring)."""
        return self.markov_w2(self.markov_w1(prev_ids))


class GatedMarkovHead(VanillaMarkovHead):
    """The previous-token embedding is gated by the backbone state: sigma(W_g [h_k; e]) * e."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, output_size: Optional[int] = None):
        super().__init__(vocab_size, rank, hidden_size, output_size)
        self.gate = Linear(hidden_size + rank, rank)

    def _bias(self, hidden_k: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        embed = self.markov_w1(prev_ids)
        gated = torch.sigmoid(self.gate(torch.cat([hidden_k, embed.to(hidden_k.dtype)], dim=-1))) * embed
        return self.markov_w2(gated)

    def transition(self, hidden):
        return lambda k, prev_ids, state: (self._bias(hidden[:, k], prev_ids), None)

    def block_bias(self, hidden, prev_ids):
        return self._bias(hidden, prev_ids)


class RNNMarkovHead(VanillaMarkovHead):
    """A recurrent state over the block (Eq. 6): z_k = [s_{k-1}; W1[x_{k-1}]; h_k],
    s_k = g * s_{k-1} + (1 - g) * tanh(W_c z_k), B_k = W2 tanh(W_o z_k), g = sigma(W_g z_k)."""

    def __init__(self, vocab_size: int, rank: int, hidden_size: int, output_size: Optional[int] = None):
        super().__init__(vocab_size, rank, hidden_size, output_size)
        self.rank = rank
        self.rnn_proj = Linear(2 * rank + hidden_size, 3 * rank)

    def _step(self, hidden_k, prev_ids, state):
        embed = self.markov_w1(prev_ids)
        if state is None:
            state = embed.new_zeros(embed.shape)
        z = torch.cat([state, embed, hidden_k.to(embed.dtype)], dim=-1)
        gate, candidate, output = self.rnn_proj(z).split(self.rank, dim=-1)
        gate = torch.sigmoid(gate)
        state = gate * state + (1 - gate) * torch.tanh(candidate)
        return self.markov_w2(torch.tanh(output)), state

    def transition(self, hidden):
        return lambda k, prev_ids, state: self._step(hidden[:, k], prev_ids, state)

    def block_bias(self, hidden, prev_ids):
        biases, state = [], None
        for k in range(prev_ids.shape[-1]):
            bias, state = self._step(hidden[..., k, :], prev_ids[..., k], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


MARKOV_HEADS = {"vanilla": VanillaMarkovHead, "gated": GatedMarkovHead, "rnn": RNNMarkovHead}


class ConfidenceHead(nn.Module):
    """c_k = sigma(w . [h_k; W1[x_{k-1}]] + b) (Eq. 7): P(draft k survives | drafts < k survived).
    It never sees x_k, which is what lets the scheduler use it losslessly."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.proj = Linear(input_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).squeeze(-1)  # confidence logits [...]
