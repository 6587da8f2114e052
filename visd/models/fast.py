"""The fast inference path: the same function as the plain path, with less work and memory.

Each saving is exact algebra; only float rounding differs (probabilities within 1e-5 of the plain
path, measured in ``tests/models/test_fast.py`` and ``benchmarks/``):

- BatchNorm folded into the preceding convolution (eval statistics), and the stem run in slabs along D,
  so the full-resolution stem output is never held whole;
- conv1 (one input channel, stride 1 along D) run as a 2D convolution whose input channels are its
  7 depth taps, which oneDNN runs faster and which yields channels-last output;
- max pooling done separably (max over a 3x3x3 box = max over 3 along each axis in turn) on strided
  views, without padding copies, and ReLU applied after it (they commute), on the 8x smaller tensor;
- the organ's tokens gathered as rows of the channels-last feature maps (no flattening copy);
- the 1x1x1 token projections applied only at the organ's tokens;
- the two stacked fusion maps folded into one, ``A = W2 W1``, ``c = W2 b1 + b2``;
- single-query attention in O(n d): the key projection moves onto the query
  (``score_i = h_i . (A^T Wk_h^T q_h)``) and the value projection after the weighted mean
  (``out_h = Wv_h (A mean_p(h) + c) + bv_h``), via :func:`visd.kernels.segment_softmax_pool`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visd.kernels import segment_softmax_pool
from visd.models.pooling import OrganPooling
from visd.models.vision import ResNet3d

__all__ = ["backbone_features", "organ_features", "pool_organ", "project"]


def _fold(conv: torch.nn.Conv3d, bn: torch.nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1, 1), bias


def _conv_bn(
    conv: torch.nn.Conv3d, bn: torch.nn.BatchNorm3d, x: torch.Tensor, padding=None, fmt=torch.contiguous_format
) -> torch.Tensor:
    """``bn(conv(x))`` as one convolution whose output has memory format ``fmt``."""
    w, b = _fold(conv, bn)
    x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    return F.conv3d(x, w.to(x.dtype), b.to(x.dtype), conv.stride, conv.padding if padding is None else padding, conv.dilation)


def _rows(x: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """Every second row of ``x`` along ``dim``: rows ``start, start + 2, ...``, ``count`` of them."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, start + 2 * count - 1, 2)
    return x[tuple(index)]


def _max3_stride2(x: torch.Tensor, dim: int, shift: int, count: int) -> torch.Tensor:
    """Max pooling with window 3 and stride 2 along one axis, without padding copies.

    Output ``i`` is the max of the rows ``2i + shift - 1``, ``2i + shift``, ``2i + shift + 1`` of ``x``
    along ``dim`` that exist (missing rows count as -inf, as max pooling's padding does); ``shift`` is 0
    or 1 and the centre rows must exist. The output keeps the memory format of ``x``.
    """
    m = x.shape[dim]
    centre = _rows(x, dim, shift, count)
    y = torch.empty_like(centre)  # preserve_format: a strided channels-last view gives channels-last
    right = min(count, (m - shift) // 2)  # outputs whose row 2i + shift + 1 exists
    head = y.narrow(dim, 0, right)
    torch.maximum(centre.narrow(dim, 0, right), _rows(x, dim, shift + 1, right), out=head)
    if right < count:
        y.narrow(dim, right, count - right).copy_(centre.narrow(dim, right, count - right))
    first = 1 - shift  # the first output whose row 2i + shift - 1 exists
    tail = y.narrow(dim, first, count - first)
    torch.maximum(tail, _rows(x, dim, 2 * first + shift - 1, count - first), out=tail)
    return y


def _stem_conv(conv: torch.nn.Conv3d, weight: torch.Tensor, bias: torch.Tensor, slab: torch.Tensor) -> torch.Tensor:
    """conv1 (stride 1 along D) on a D-padded slab, with no padding along D: ``(B, O, rows, h, w)``.

    The D taps become input channels of a 2D convolution over (H, W), batched over the output rows
    (``y[r] = sum_c,d w[:, c, d] * x[c, r + d]``, the same sum); on the CPU this runs faster than the
    3D convolution with its single input channel, and yields channels-last 3D output.
    """
    bsz, cin, n = slab.shape[:3]
    kd = conv.kernel_size[0]
    rows = n - kd + 1
    by_row = slab.permute(0, 2, 3, 4, 1)  # (B, n, H, W, C)
    taps = torch.stack([by_row[:, d : d + rows] for d in range(kd)], -1)  # (B, rows, H, W, C, kd)
    taps = taps.view(bsz * rows, *taps.shape[2:4], cin * kd).permute(0, 3, 1, 2)
    w2d = weight.reshape(weight.shape[0], cin * kd, *weight.shape[3:]).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(taps, w2d.to(slab.dtype), bias.to(slab.dtype), conv.stride[1:], conv.padding[1:])  # (B*rows, O, h, w)
    return y.view(bsz, rows, *y.shape[1:]).transpose(1, 2)


# conv1 output values per slab of the stem (about 256 MiB of float32)
_STEM_SLAB_VALUES = 1 << 26


def _stem(backbone: ResNet3d, x: torch.Tensor, fmt=torch.contiguous_format) -> torch.Tensor:
    """conv1 -> BatchNorm -> max pool -> ReLU (ReLU commutes with max), in slabs along D so the
    full-resolution conv1 output (the largest activation of the network) is never held whole.

    Max pooling runs separably (max over a 3x3x3 box = max over 3 along each axis in turn, exact) on
    conv1's channels-last output, where every pooled row is a contiguous run of channels. The result
    has memory format ``fmt``.
    """
    conv = backbone.conv1
    kd, pd = conv.kernel_size[0], conv.padding[0]
    if conv.stride[0] != 1 or kd != 2 * pd + 1 or x.device.type != "cpu":
        return F.max_pool3d(_conv_bn(conv, backbone.bn1, x, fmt=fmt), 3, 2, 1).relu_().contiguous(memory_format=fmt)
    weight, bias = _fold(conv, backbone.bn1)
    n = x.shape[2]
    h, w = ((size + 2 * p - k) // s + 1 for size, p, k, s in zip(x.shape[3:], conv.padding[1:], conv.kernel_size[1:], conv.stride[1:]))
    out_d, out_h, out_w = (n - 1) // 2 + 1, (h - 1) // 2 + 1, (w - 1) // 2 + 1
    out = torch.empty((x.shape[0], conv.out_channels, out_d, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
    step = max(1, _STEM_SLAB_VALUES // (2 * conv.out_channels * x.shape[0] * h * w))
    for a in range(0, out_d, step):
        b = min(out_d, a + step)
        r0, r1 = max(2 * a - 1, 0), min(2 * b, n)  # conv1 rows the pooled rows a..b-1 need
        i0, i1 = r0 - pd, r1 + pd  # input rows those conv rows need
        slab = x[:, :, max(i0, 0) : min(i1, n)]
        slab = F.pad(slab, (0, 0, 0, 0, max(0, -i0), max(0, i1 - n)))
        y = _stem_conv(conv, weight, bias, slab)
        y = _max3_stride2(y, 2, 0 if a == 0 else 1, b - a)  # slab row 0 is conv row 2a - 1 after the first
        y = _max3_stride2(_max3_stride2(y, 3, 0, out_h), 4, 0, out_w)
        out[:, :, a:b] = y.relu_()
        del y
    return out


def _block(block, x: torch.Tensor, fmt) -> torch.Tensor:
    residual = x if block.shortcut is None else block.shortcut(x).contiguous(memory_format=fmt)
    out = _conv_bn(block.conv1, block.bn1, x, fmt=fmt).relu_()
    out = _conv_bn(block.conv2, block.bn2, out, fmt=fmt)
    return out.add_(residual).relu_()


@torch.no_grad()
def backbone_features(backbone: ResNet3d, image: torch.Tensor, *, channels_last: bool = False) -> list[torch.Tensor]:
    """The four stage outputs of ``backbone`` in eval mode, without gradients.

    Args:
        image: ``(B, C, D, H, W)``.
        channels_last: run the residual stages in the channels-last 3D memory format.
    """
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = _stem(backbone, image, fmt)
    feats = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, name):
            x = _block(block, x, fmt)
        feats.append(x)
    return feats


def organ_features(feats: list[torch.Tensor], flags: list[torch.Tensor], b: int, o: int) -> list[torch.Tensor]:
    """Backbone features ``(n_k, C_k)`` at the tokens of organ ``o`` in batch item ``b``, per level."""
    rows = []
    for f, fl in zip(feats, flags):
        by_token = f[b].permute(1, 2, 3, 0).reshape(-1, f.shape[1])  # a view for channels-last maps
        rows.append(by_token.index_select(0, torch.nonzero(fl[b, o]).flatten()))
    return rows


def project(proj: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution applied to token rows ``(n, C_in)`` -> ``(n, C_out)``."""
    return torch.addmm(proj.bias, x, proj.weight.view(proj.out_channels, proj.in_channels).t())


SharedPart = tuple[torch.Tensor, "torch.nn.Conv3d | None"]


def pool_organ(
    pooling: OrganPooling,
    shared: list[SharedPart],
    roi: torch.Tensor,
    normal_roi: torch.Tensor,
    o: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The attention output ``(E,)`` of :meth:`OrganPooling.attend`, in O(n C).

    Args:
        shared: the non-level-4 tokens, whose two hybrid halves are equal, as parts ``(x, proj)``:
            ``x`` ``(n, C)`` backbone features with the 1x1x1 ``proj`` that makes them tokens, or
            already projected tokens ``(n, E)`` with ``proj=None``. Scores and means are taken in the
            ``C``-wide feature space, so the tokens are never projected.
        roi, normal_roi: ``(n4, E)`` the level-4 tokens and their normal reconstruction.
    """
    mha = pooling.attention
    e, h = mha.embed_dim, mha.num_heads
    dh = e // h
    scale = dh**-0.5
    w1, b1 = pooling.fuse1[o].weight, pooling.fuse1[o].bias
    w2, b2 = pooling.fuse2[o].weight, pooling.fuse2[o].bias
    a = w2 @ w1  # (E, 2E): the folded fusion
    c = w2 @ b1 + b2
    a_shared = a[:, :e] + a[:, e:]  # [t ; t] -> (A_l + A_r) t
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, _, bv = mha.in_proj_bias.chunk(3)
    q = (wq @ pooling.query_tokens[o] + bq).view(h, dh)
    kq = torch.einsum("hd,hde->he", q, wk.view(h, dh, e))  # Wk_h^T q_h: score = fused . kq_h
    u = kq @ a  # (H, 2E)
    u_shared = kq @ a_shared  # (H, E)
    lses, means = [], []  # per part: (H,) log-sum-exp of its logits, (H, E) its mean fused token (minus c)
    for x, proj in shared:
        if proj is None:
            w_in, offset, to_tokens = u_shared, 0.0, lambda m: m
        else:
            p = proj.weight.view(proj.out_channels, proj.in_channels)
            w_in, offset = u_shared @ p, (u_shared @ proj.bias) * scale
            to_tokens = lambda m, p=p, bias=proj.bias: m @ p.t() + bias  # noqa: E731
        out = _pool_one(x, None, w_in, None, scale, backend)
        lses.append(out.lse[0] + offset)
        means.append(to_tokens(out.pooled_a[0]) @ a_shared.t())
    out = _pool_one(roi, normal_roi, u[:, :e], u[:, e:], scale, backend)
    lses.append(out.lse[0])
    means.append(out.pooled_a[0] @ a[:, :e].t() + out.pooled_b[0] @ a[:, e:].t())
    weights = torch.softmax(torch.stack(lses), dim=0)  # (parts, H)
    fused_mean = (weights[..., None] * torch.stack(means)).sum(0) + c  # (H, E)
    values = torch.einsum("hde,he->hd", wv.view(h, dh, e), fused_mean) + bv.view(h, dh)
    return mha.out_proj(values.reshape(e))


def _pool_one(x_a, x_b, u_a, u_b, scale, backend):
    offsets = torch.tensor([0, x_a.shape[0]], device=x_a.device)
    return segment_softmax_pool(
        x_a.contiguous() if x_a.stride(-1) != 1 else x_a,
        x_b,
        offsets,
        u_a[None].contiguous(),
        None if u_b is None else u_b[None].contiguous(),
        scale,
        backend=backend,
    )
