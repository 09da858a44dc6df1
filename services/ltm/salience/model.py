"""The salience model in torch, for training only (ltm runs :mod:`services.ltm.salience.infer`, numpy).

The same pass as infer.py's, over padded batches of sessions: attention pooling of each turn's token vectors,
the turn's features, and an LSTM cell written out gate by gate (explicit matmuls: no ``nn.LSTM``/``LSTMCell``)
stepped over the turns of each session, the state carried from turn to turn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from services.ltm.salience.infer import DIM, EXTRA, NAMES


class Salience(nn.Module):
    def __init__(self, hidden: int = 64, att: int = 32, proj: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def init(*shape: int, scale: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * scale)

        inp = 3 * DIM + EXTRA
        self.hidden = hidden
        self.att_w, self.att_b, self.att_v = init(DIM, att, scale=DIM ** -0.5), init(att, scale=0.0), init(
            att, scale=att ** -0.5)
        self.in_w, self.in_b = init(inp, proj, scale=inp ** -0.5), init(proj, scale=0.0)
        self.w_x, self.w_h = init(proj, 4 * hidden, scale=proj ** -0.5), init(hidden, 4 * hidden, scale=hidden ** -0.5)
        bias = torch.zeros(4 * hidden)
        bias[hidden:2 * hidden] = 1.0  # forget gate open at the start
        self.b = nn.Parameter(bias)
        self.out_w, self.out_b = init(hidden + proj, 1, scale=(hidden + proj) ** -0.5), init(1, scale=0.0)

    def pool(self, tokens: Tensor, tmask: Tensor) -> Tensor:
        """(B, L, T, D) token vectors, (B, L, T) mask -> (B, L, D) attention-pooled, L2-normalised."""
        a = torch.tanh(tokens @ self.att_w + self.att_b) @ self.att_v
        a = a.masked_fill(~tmask, -1e9)
        w = torch.softmax(a, dim=-1) * tmask
        v = (w.unsqueeze(-1) * tokens).sum(-2)
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def features(self, pooled: Tensor, sent: Tensor, prev: Tensor, assistant: Tensor, n_tokens: Tensor) -> Tensor:
        cos = (sent * prev).sum(-1, keepdim=True)
        extra = torch.stack([assistant, torch.log1p(n_tokens) / 5.0], -1)
        return torch.tanh(torch.cat([pooled, sent, prev, cos, extra], -1) @ self.in_w + self.in_b)

    def step(self, u: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.hidden
        z = u @ self.w_x + h @ self.w_h + self.b
        i = torch.sigmoid(z[..., :n])  # input gate
        f = torch.sigmoid(z[..., n:2 * n])  # forget gate
        g = torch.tanh(z[..., 2 * n:3 * n])  # cell candidate
        o = torch.sigmoid(z[..., 3 * n:])  # output gate
        c2 = f * c + i * g
        h2 = o * torch.tanh(c2)
        logit = (torch.cat([h2, u], -1) @ self.out_w + self.out_b)[..., 0]
        return logit, h2, c2

    def forward(self, tokens: Tensor, tmask: Tensor, sent: Tensor, assistant: Tensor, n_tokens: Tensor) -> Tensor:
        """Logits (B, L) for B sessions of L turns (padding after a session's end is harmless: it comes last)."""
        pooled = self.pool(tokens, tmask)
        prev = torch.cat([torch.zeros_like(sent[:, :1]), sent[:, :-1]], 1)
        u = self.features(pooled, sent, prev, assistant, n_tokens)
        b = sent.shape[0]
        h = sent.new_zeros(b, self.hidden)
        c = sent.new_zeros(b, self.hidden)
        logits = []
        for t in range(sent.shape[1]):
            y, h, c = self.step(u[:, t], h, c)
            logits.append(y)
        return torch.stack(logits, 1)

    def export(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).detach().cpu().numpy().astype(np.float32) for k in NAMES}
