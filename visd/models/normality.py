"""The normality model: a VQ-VAE over level-4 organ tokens, trained on normal anatomy.

An organ's level-4 tokens are min-max scaled to [-0.5, 0.5], prefixed with a condition token
(the organ index through a Linear(1 -> token_dim)), encoded by a small pre-norm transformer,
snapped to the nearest code of an EMA codebook and decoded. The reconstruction is what the organ's
tokens would look like if it were normal; the model fuses it with the original tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visd.config import NormalityConfig
from visd.kernels import nearest_code

__all__ = ["NormalityModel", "NormalityOutput", "EMAQuantizer", "QuantizerOutput", "minmax_scale"]


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Self-attention; ``fused`` uses :func:`F.scaled_dot_product_attention` (the same function,
        float rounding only) instead of the official matmul-softmax-matmul order."""
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, -1))
        if fused:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
            out = torch.matmul(attn, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim), nn.Dropout(0.0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Transformer(nn.Module):
    """Pre-norm blocks ``x = attn(x) + x; x = ff(x) + x`` and a final LayerNorm; no positions."""

    def __init__(self, config: NormalityConfig) -> None:
        super().__init__()
        c = config
        self.layers = nn.ModuleList(
            nn.ModuleList([_Attention(c.dim, c.heads, c.head_dim), _FeedForward(c.dim, c.mlp_dim)])
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x, fused) + x
            x = ff(x) + x
        return self.norm(x)


class _Encoder(nn.Module):
    def __init__(self, token_dim: int, config: NormalityConfig) -> None:
        super().__init__()
        self.input1 = nn.Linear(token_dim, config.hidden_dim)
        self.input2 = nn.Linear(config.hidden_dim, config.dim)
        self.transformer = _Transformer(config)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return self.transformer(self.input2(self.input1(x)), fused)


class _Decoder(nn.Module):
    def __init__(self, token_dim: int, config: NormalityConfig) -> None:
        super().__init__()
        self.transformer = _Transformer(config)
        self.output1 = nn.Linear(config.dim, config.hidden_dim)
        self.output2 = nn.Linear(config.hidden_dim, token_dim)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return self.output2(self.output1(self.transformer(x, fused)))


@dataclass
class QuantizerOutput:
    """Result of :meth:`EMAQuantizer.forward`.

    Attributes:
        quantized: ``(..., dim)`` codebook rows (inference) or the straight-through
            ``z + (q - z).detach()`` (training).
        codes: ``(...)`` int64 index of the nearest codebook row.
        commitment_loss: scalar ``commitment_cost * mse(z, sg(q))`` (0 at inference or for no rows).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment_loss: torch.Tensor


class _EMA(nn.Module):
    """An exponential moving average with a persistent ``hidden`` state."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("hidden", torch.zeros(shape))

    def update(self, value: torch.Tensor, decay: float, steps: int) -> torch.Tensor:
        """Update the state and return its bias-corrected average after ``steps`` updates."""
        self.hidden.mul_(decay).add_(value, alpha=1.0 - decay)
        return self.hidden / (1.0 - decay**steps)


class EMAQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with an exponential-moving-average codebook.

    Inference returns the codebook rows themselves. In training mode it also updates the codebook
    (Sonnet's VQ-VAE v2 rule, with Laplace smoothing ``eps`` of the cluster sizes) and returns the
    straight-through estimate and the commitment loss.
    """

    def __init__(self, config: NormalityConfig) -> None:
        super().__init__()
        self.decay = config.decay
        self.eps = config.eps
        self.commitment_cost = config.commitment_cost
        k, d = config.codebook_size, config.dim
        self.register_buffer("embeddings", torch.randn(k, d))
        self.ema_dw = _EMA((k, d))
        self.ema_cluster_size = _EMA((k,))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.int64))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (L2) for each row of ``z`` ``(N, dim)``; ties go to the lowest."""
        return nearest_code(z, self.embeddings).indices

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` of shape ``(..., dim)``."""
        flat = z.reshape(-1, z.shape[-1])
        codes = self.nearest(flat.detach().float())
        q = self.embeddings[codes].to(z.dtype)
        if not self.training:
            zero = z.new_zeros(())
            return QuantizerOutput(q.reshape(z.shape), codes.reshape(z.shape[:-1]), zero)
        self._ema_update(flat.detach().float(), codes)
        q = self.embeddings[codes].to(z.dtype)
        commitment = self.commitment_cost * F.mse_loss(flat, q.detach()) if len(flat) else z.new_zeros(())
        st = flat + (q - flat).detach()
        return QuantizerOutput(st.reshape(z.shape), codes.reshape(z.shape[:-1]), commitment)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        k = self.embeddings.shape[0]
        onehot = F.one_hot(codes, k).to(flat.dtype)
        counts, dw = onehot.sum(0), onehot.t() @ flat
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(dw)
        if not bool(counts.sum()):  # no vector anywhere (the same decision on every process): no update
            return
        self.ema_steps += 1
        steps = int(self.ema_steps)
        cluster = self.ema_cluster_size.update(counts, self.decay, steps)
        total = cluster.sum()
        cluster = (cluster + self.eps) / (total + k * self.eps) * total
        self.embeddings.copy_(self.ema_dw.update(dw, self.decay, steps) / cluster[:, None])


def minmax_scale(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale ``(n, C)`` tokens with one scalar min and range to [-0.5, 0.5]; returns (scaled, min, range)."""
    mn = tokens.min()
    mx = (tokens - mn).max()
    return (tokens - mn) / mx - 0.5, mn, mx


@dataclass
class NormalityOutput:
    """Result of :meth:`NormalityModel.forward` for one organ's tokens.

    Attributes:
        reconstruction: ``(n, C)`` the "normal" tokens, on the scale of the input.
        decoded: ``(n, C)`` decoder output before undoing the min-max scaling.
        codes: ``(n,)`` codebook indices.
        encoded: ``(n, dim)`` encoder output (condition token dropped).
        quantized: ``(n, dim)`` the codebook rows (the straight-through estimate in train mode).
        scaled_input: ``(n, C)`` the min-max scaled input, the reconstruction target.
    """

    reconstruction: torch.Tensor
    decoded: torch.Tensor
    codes: torch.Tensor
    encoded: torch.Tensor
    quantized: torch.Tensor
    scaled_input: torch.Tensor


class NormalityModel(nn.Module):
    """Condition token, encoder, EMA codebook and decoder."""

    def __init__(self, token_dim: int, config: NormalityConfig) -> None:
        super().__init__()
        self.condition = nn.Linear(1, token_dim)
        self.encoder = _Encoder(token_dim, config)
        self.quantizer = EMAQuantizer(config)
        self.decoder = _Decoder(token_dim, config)

    def encode(self, scaled: torch.Tensor, organ_index: int, *, fused_attention: bool = False) -> torch.Tensor:
        """Encoder output ``(n, dim)`` for min-max scaled tokens ``(n, C)`` of organ ``organ_index``."""
        cond = self.condition(scaled.new_tensor([float(organ_index)]))
        return self.encoder(torch.cat([cond[None], scaled], 0)[None], fused_attention)[0, 1:]

    def forward(
        self, tokens: Sequence[torch.Tensor], organs: Sequence[int], *, fused_attention: bool = False
    ) -> list[NormalityOutput]:
        """Reconstruct organs' level-4 tokens as normal anatomy, with one quantiser call for all.

        Each organ is encoded and decoded on its own (the official operation order); the codes of
        all organs are looked up together, so in train mode the codebook gets exactly one EMA update
        (one set of collectives under ``torch.distributed``) per call, whatever the organ count.

        Args:
            tokens: per organ, its level-4 tokens ``(n_i, C)``.
            organs: per organ, its index (the condition token).
            fused_attention: run the transformers' attention through
                :func:`torch.nn.functional.scaled_dot_product_attention` (fused on CPU and GPU; float
                rounding only) instead of the official operation order.
        """
        scaled = [minmax_scale(t) for t in tokens]
        encoded = [self.encode(s, o, fused_attention=fused_attention) for (s, _, _), o in zip(scaled, organs)]
        dim = self.quantizer.embeddings.shape[1]
        z = torch.cat(encoded) if encoded else self.quantizer.embeddings.new_zeros((0, dim))
        vq = self.quantizer(z)
        sizes = [e.shape[0] for e in encoded]
        outs = []
        for (s, mn, mx), e, q, codes in zip(scaled, encoded, vq.quantized.split(sizes), vq.codes.split(sizes)):
            decoded = self.decoder(q[None], fused_attention)[0]
            outs.append(NormalityOutput((decoded + 0.5) * mx + mn, decoded, codes, e, q, s))
        return outs
