"""Where the official operation order loses precision on the synthetic 240 x 480 x 480 chest volume:
its attention pooling (``OrganPooling.attend``, ``nn.MultiheadAttention`` in float32) against the
same computation in float64 on the same float32 inputs, per organ, and for the largest organ the
two float32 steps that sum over all tokens (the softmax normalisation, the weighted sum of values)
each alone. Prints only (no row in README.md); about two minutes on a 2-core CPU::

    python benchmarks/precision_pooling.py
"""

from __future__ import annotations

import torch

from _common import chest_volume, full_size_model, set_mode
from visd.models.pooling import OrganPooling


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def main() -> None:
    torch.set_grad_enabled(False)
    model = full_size_model("cpu")
    set_mode(model, "official")
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    attend = OrganPooling.attend

    def keep(self, original, normal, organ_index):
        out = attend(self, original, normal, organ_index)
        inputs[organ_index] = (original.clone(), normal.clone(), out.clone())
        return out

    OrganPooling.attend = keep
    try:
        model.encode_image(*chest_volume())
    finally:
        OrganPooling.attend = attend
    pooling = model.pooling.double()
    for o, (original, normal, out) in sorted(inputs.items(), key=lambda kv: -kv[1][0].shape[0]):
        exact = pooling.attend(original.double(), normal.double(), o)
        print(f"{model.organs[o]:>10}: {original.shape[0]:>7} tokens, float32 attention output {_rel(out, exact):.1e} "
              "relative to float64 on the same inputs")
    # the largest organ, step by step
    o, (original, normal, _) = max(inputs.items(), key=lambda kv: kv[1][0].shape[0])
    mha = pooling.attention
    dim, heads = mha.embed_dim, mha.num_heads
    fused = pooling.fuse2[o](pooling.fuse1[o](torch.cat([original, normal], -1).double()))
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = (pooling.query_tokens[o] @ w[:dim].t() + b[:dim]).view(heads, -1)
    k = (fused @ w[dim : 2 * dim].t() + b[dim : 2 * dim]).view(-1, heads, dim // heads)
    v = (fused @ w[2 * dim :].t() + b[2 * dim :]).view(-1, heads, dim // heads)
    scores = torch.einsum("hd,nhd->hn", q, k) / (dim // heads) ** 0.5
    weights = torch.softmax(scores, -1)
    exact = torch.einsum("hn,nhd->hd", weights, v)
    weights32 = torch.softmax(scores.float(), -1)
    print(f"{model.organs[o]}: attention weights {float(weights.max()):.2e} at most (uniform: {1 / len(fused):.2e}); "
          f"float32 softmax weights sum to 1 within {float((weights32.double().sum(-1) - 1).abs().max()):.1e}")
    by_softmax = torch.einsum("hn,nhd->hd", weights32.double(), v)
    by_sum = torch.bmm(weights.float()[:, None], v.float().transpose(0, 1))[:, 0]
    print(f"{model.organs[o]}: weighted sum of values off by {_rel(by_softmax, exact):.1e} with only the softmax in "
          f"float32, {_rel(by_sum, exact):.1e} with only the sum in float32")


if __name__ == "__main__":
    main()
