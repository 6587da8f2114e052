"""The fused numerics: the same function as the official operation order, with less work and memory.

Each saving is exact algebra; only float rounding differs (probabilities within 1e-5 of the official
order in ``tests/models/test_fused.py`` and on the real CT of ``tests/models/test_official.py``; see
``docs/performance.md`` for a full-size volume, where the official order's own float32 rounding is
the limit). This module holds the backbone's part, :mod:`visd.models.fused_pooling` the organs' part;
:class:`visd.models.image_path.FusedPath` puts these pieces together.

- BatchNorm folded into the preceding convolution (eval statistics) once, by :class:`FoldedBackbone`
  (inference only: in train mode BatchNorm uses batch statistics), and the stem run in slabs along D,
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
  (``out_h = Wv_h (A mean_p(h) + c) + bv_h``), via :func:`visd.kernels.segment_softmax_pool`;
- large temporaries in reused memory (fresh ones cost page faults): the stem's slabs share their
  buffers and, on a CPU with oneDNN, the convolutions write into reused zeroed tensors or add
  themselves to the residual in place (oneDNN's sum post-op, the ReLU fused).

The normality model's attention runs through ``scaled_dot_product_attention`` with these numerics
(:class:`visd.models.normality.NormalityModel`, ``fused_attention``). With gradients (training), the
pooling runs in plain differentiable torch (:func:`visd.models.fused_pooling.pool_organ`) and the
backbone is the module's own computation (BatchNorm batch statistics) in channels-last 3D
(:func:`channels_last_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visd.models.vision import ResNet3d

__all__ = ["FoldedBackbone", "channels_last_features", "cpu_autocast_dtype", "inplace_convolutions"]


def _fold(conv: torch.nn.Conv3d, bn: torch.nn.BatchNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1, 1), bias


def _conv_bn(folded: "FoldedBackbone", conv: torch.nn.Conv3d, x: torch.Tensor, fmt=torch.contiguous_format) -> torch.Tensor:
    """``bn(conv(x))`` as one convolution (folded weights) whose output has memory format ``fmt``."""
    w, b = folded.weights(conv, fmt, x.dtype)  # under autocast, conv3d casts them as it casts x
    return F.conv3d(x.contiguous(memory_format=fmt), w, b, conv.stride, conv.padding, conv.dilation)


def cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype of the CPU autocast in force (a training stage's ``precision: bf16``), or None."""
    try:
        enabled, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except (TypeError, AttributeError):  # torch < 2.4
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else None


def inplace_convolutions(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`_conv_add_` can run on tensors of ``device`` and ``dtype``: float32 or bfloat16
    on a CPU with oneDNN (outside autocast, see :func:`_accumulates`)."""
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
    )


def _accumulates(x: torch.Tensor) -> bool:
    """:func:`inplace_convolutions` for ``x``, here: not under a CPU autocast, whose casts and fresh
    outputs the in-place convolutions cannot take."""
    return inplace_convolutions(x.device, x.dtype) and cpu_autocast_dtype() is None


def _conv_add_(
    out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, conv, *, relu: bool, dims: int = 3
) -> torch.Tensor:
    """``out = conv(x) + out`` (then ReLU when ``relu``), computed by oneDNN into ``out`` in place.

    The same convolution as ``F.conv3d`` (oneDNN's sum post-op adds ``out`` to the result before it
    is stored), without a fresh output tensor; ``dims=2`` runs the last two spatial axes of ``conv``'s
    geometry as a 2D convolution. ``out`` and ``x`` must be channels-last.
    """
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, x, w, b, list(conv.padding[-dims:]), list(conv.stride[-dims:]), list(conv.dilation[-dims:]),
        conv.groups, "add", None, "relu" if relu else None, [], None,
    )


def _zeroed(pool: dict, shape: tuple[int, ...], like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A zero-filled tensor of ``shape`` from ``pool``, reusing the one of the same shape taken before.

    Fresh large tensors cost page faults (glibc hands allocations over 32 MiB back to the system when
    they are freed, and the system zero-fills every page again when they are next taken; see
    ``docs/performance.md``); zeroing reused memory is cheaper.
    """
    key = (shape, fmt)
    if key not in pool:
        pool[key] = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    return pool[key].zero_()


def _out_size(conv: torch.nn.Conv3d, sizes) -> tuple[int, ...]:
    """Spatial output size of ``conv`` for input ``sizes`` ``(D, H, W)``."""
    geometry = zip(sizes, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in geometry)


def _rows(x: torch.Tensor, dim: int, start: int, count: int) -> torch.Tensor:
    """Every second row of ``x`` along ``dim``: rows ``start, start + 2, ...``, ``count`` of them."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, start + 2 * count - 1, 2)
    return x[tuple(index)]


def _max3_stride2(x: torch.Tensor, dim: int, shift: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Max pooling with window 3 and stride 2 along one axis, without padding copies.

    Output ``i`` is the max of the rows ``2i + shift - 1``, ``2i + shift``, ``2i + shift + 1`` of ``x``
    along ``dim`` that exist (missing rows count as -inf, as max pooling's padding does); ``shift`` is 0
    or 1 and the centre rows must exist. The output keeps the memory format of ``x``, or is written
    into ``out`` (the output's shape, not overlapping ``x``).
    """
    m = x.shape[dim]
    centre = _rows(x, dim, shift, count)
    y = torch.empty_like(centre) if out is None else out  # empty_like: a strided channels-last view gives channels-last
    right = min(count, (m - shift) // 2)  # outputs whose row 2i + shift + 1 exists
    head = y.narrow(dim, 0, right)
    torch.maximum(centre.narrow(dim, 0, right), _rows(x, dim, shift + 1, right), out=head)
    if right < count:
        y.narrow(dim, right, count - right).copy_(centre.narrow(dim, right, count - right))
    first = 1 - shift  # the first output whose row 2i + shift - 1 exists
    tail = y.narrow(dim, first, count - first)
    torch.maximum(tail, _rows(x, dim, 2 * first + shift - 1, count - first), out=tail)
    return y


def _stem_conv(
    conv: torch.nn.Conv3d,
    weight: torch.Tensor,
    bias: torch.Tensor,
    slab: torch.Tensor,
    taps: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """conv1 (stride 1 along D) on a D-padded slab, with no padding along D: ``(B, O, rows, h, w)``.

    The D taps become input channels of a 2D convolution over (H, W), batched over the output rows
    (``y[r] = sum_c,d w[:, c, d] * x[c, r + d]``, the same sum); on the CPU this runs faster than the
    3D convolution with its single input channel, and yields channels-last 3D output. ``taps``, when
    given, is a channels-last ``(B * rows, C * kd, H, W)`` tensor to hold the taps, and ``out`` a
    zero-filled channels-last ``(B * rows, O, h, w)`` tensor to hold the output (see :func:`_conv_add_`).
    """
    bsz, cin, n = slab.shape[:3]
    kd = conv.kernel_size[0]
    rows = n - kd + 1
    view = slab.unfold(2, kd, 1).permute(0, 2, 1, 5, 3, 4)  # (B, rows, C, kd, H, W), no copy
    if taps is None:
        taps = torch.empty((bsz * rows, cin * kd, *slab.shape[3:]), dtype=slab.dtype, device=slab.device,
                           memory_format=torch.channels_last)
    taps.view(view.shape).copy_(view)
    w2d = weight.reshape(weight.shape[0], cin * kd, *weight.shape[3:]).contiguous(memory_format=torch.channels_last)
    if out is not None:
        y = _conv_add_(out, taps, w2d, bias, conv, relu=False, dims=2)  # out is zero: y = conv(taps)
    else:
        bias = None if bias is None else bias.to(slab.dtype)
        y = F.conv2d(taps, w2d.to(slab.dtype), bias, conv.stride[1:], conv.padding[1:])  # (B*rows, O, h, w)
    return y.view(bsz, rows, *y.shape[1:]).transpose(1, 2)


# conv1 output values per slab of the stem (64 MiB of float32)
_STEM_SLAB_VALUES = 1 << 24


def _slab_buffer(shape: tuple[int, ...], like: torch.Tensor, fmt: torch.memory_format):
    """Memory reused by every slab, as ``take(n)``: the leading ``n`` entries along the slab axis.

    Each slab's temporaries would otherwise be fresh allocations, which cost page faults (see
    :func:`_zeroed`). The slab axis (0 for 2D maps, 2 for 3D maps) is the outermost of ``fmt``'s
    layout when the batch is 1.
    """
    storage = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    dim = 0 if len(shape) == 4 else 2
    return lambda n: storage.narrow(dim, 0, n)


def _stem(folded: "FoldedBackbone", x: torch.Tensor, fmt=torch.contiguous_format, in_place: bool = False) -> torch.Tensor:
    """conv1 -> BatchNorm -> max pool -> ReLU (ReLU commutes with max), in slabs along D so the
    full-resolution conv1 output (the largest activation of the network) is never held whole.

    Max pooling runs separably (max over a 3x3x3 box = max over 3 along each axis in turn, exact) on
    conv1's channels-last output, where every pooled row is a contiguous run of channels. The result
    has memory format ``fmt``. Every slab reuses the memory of the first; ``in_place`` lets conv1
    write into it too (see :func:`_conv_add_`).
    """
    conv = folded.backbone.conv1
    kd, pd = conv.kernel_size[0], conv.padding[0]
    if conv.stride[0] != 1 or kd != 2 * pd + 1 or x.device.type != "cpu":
        return F.max_pool3d(_conv_bn(folded, conv, x, fmt=fmt), 3, 2, 1).relu_().contiguous(memory_format=fmt)
    weight, bias = folded.weights(conv, torch.contiguous_format, x.dtype)
    n = x.shape[2]
    h, w = _out_size(conv, x.shape[2:])[1:]
    out_d, out_h, out_w = (n - 1) // 2 + 1, (h - 1) // 2 + 1, (w - 1) // 2 + 1
    bsz, cl3 = x.shape[0], torch.channels_last_3d
    out = torch.empty((bsz, conv.out_channels, out_d, out_h, out_w), dtype=x.dtype, device=x.device, memory_format=fmt)
    step = max(1, _STEM_SLAB_VALUES // (2 * conv.out_channels * bsz * h * w))
    taps = _slab_buffer((bsz * (2 * step + 1), x.shape[1] * kd, *x.shape[3:]), x, torch.channels_last)
    by_d = _slab_buffer((bsz, conv.out_channels, step, h, w), x, cl3)  # pooled along D
    by_dh = _slab_buffer((bsz, conv.out_channels, step, out_h, w), x, cl3)  # ... and along H
    conv_out = _slab_buffer((bsz * (2 * step + 1), conv.out_channels, h, w), x, torch.channels_last) if in_place else None
    for a in range(0, out_d, step):
        b = min(out_d, a + step)
        r0, r1 = max(2 * a - 1, 0), min(2 * b, n)  # conv1 rows the pooled rows a..b-1 need
        i0, i1 = r0 - pd, r1 + pd  # input rows those conv rows need
        slab = x[:, :, max(i0, 0) : min(i1, n)]
        slab = F.pad(slab, (0, 0, 0, 0, max(0, -i0), max(0, i1 - n)))
        rows = bsz * (r1 - r0)
        y = _stem_conv(conv, weight, bias, slab, taps(rows), None if conv_out is None else conv_out(rows).zero_())
        # slab row 0 is conv row 2a - 1 after the first slab
        pooled = _max3_stride2(y, 2, 0 if a == 0 else 1, b - a, by_d(b - a))
        del y
        pooled = _max3_stride2(pooled, 3, 0, out_h, by_dh(b - a))
        _max3_stride2(pooled, 4, 0, out_w, out[:, :, a:b]).relu_()
    return out


#: bf16 maps run convolutions dilated this much or more in float32: oneDNN's bf16 kernels for them
#: (layer 4: 512 channels, dilation 4) ran 2x to 8x slower than its float32 ones on a Xeon with AMX
#: (251 ms against 33 ms on a lung window's 11 x 14 x 12 map), while dilation 2 runs at AMX speed
_BF16_MAX_DILATION = 3


def _block(folded: "FoldedBackbone", block, x: torch.Tensor, fmt, pool: dict | None = None, x_is_free: bool = False) -> torch.Tensor:
    """One residual block. With a ``pool`` (channels-last float32 or bfloat16 on a CPU), the first
    convolution writes into reused memory and the second adds itself to the residual in place, with
    the ReLU fused; ``x_is_free`` says ``x`` may be overwritten when it is the residual."""
    if pool is None:
        residual = x if block.shortcut is None else block.shortcut(x).contiguous(memory_format=fmt)
        out = _conv_bn(folded, block.conv1, x, fmt=fmt).relu_()
        out = _conv_bn(folded, block.conv2, out, fmt=fmt)
        return out.add_(residual).relu_()
    if block.shortcut is not None:
        residual = block.shortcut(x).contiguous(memory_format=fmt)
    else:
        residual = x.contiguous(memory_format=fmt) if x_is_free else x.clone(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    out = _zeroed(pool, (x.shape[0], block.conv1.out_channels, *_out_size(block.conv1, x.shape[2:])), x, fmt)
    for conv, target in ((block.conv1, out), (block.conv2, residual)):
        if x.dtype == torch.bfloat16 and max(conv.dilation) >= _BF16_MAX_DILATION:
            wide = target.float()  # float32 work on layer-4 maps: about a million values
            w, b = folded.weights(conv, fmt, torch.float32)
            target.copy_(_conv_add_(wide, x.float(), w, b, conv, relu=True))
        else:
            w, b = folded.weights(conv, fmt, x.dtype)
            _conv_add_(target, x, w, b, conv, relu=True)
        x = target
    return residual



class FoldedBackbone:
    """A :class:`ResNet3d`'s eval-mode computation with every BatchNorm folded into its convolution.

    Each convolution is folded once, at its first use in a memory format and dtype
    (:class:`visd.models.image_path.FusedPath` builds a new one when the weights change); calling it
    gives the four stage outputs without gradients.
    """

    def __init__(self, backbone: ResNet3d) -> None:
        self.backbone = backbone
        pairs = [(backbone.conv1, backbone.bn1)]
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(backbone, name):
                pairs += [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        self._pairs = {id(conv): (conv, bn) for conv, bn in pairs}
        self._formatted: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(
        self, conv: torch.nn.Conv3d, fmt: torch.memory_format, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight (in memory format ``fmt``) and bias of ``conv`` and its BatchNorm, in ``dtype``
        (folded in the weights' own precision, then cast)."""
        key = (id(conv), fmt, dtype)
        if key not in self._formatted:  # folded on first use: one copy of the weights per format in use
            with torch.no_grad():
                w, b = _fold(*self._pairs[id(conv)])
            self._formatted[key] = (w.to(dtype).contiguous(memory_format=fmt), b.to(dtype))
        return self._formatted[key]

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, *, channels_last: bool = False) -> list[torch.Tensor]:
        """The four stage outputs for ``image`` ``(B, C, D, H, W)``, in its dtype (a bfloat16 image
        runs in bfloat16 throughout, with the reused-memory convolutions of a float32 one).

        Args:
            channels_last: run the residual stages in the channels-last 3D memory format.
        """
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        # reused memory for the convolutions' outputs (see _zeroed), where oneDNN can write into it;
        # one pool per stage, freed with it
        reuse = channels_last and _accumulates(image)
        x = _stem(self, image, fmt, in_place=reuse)
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            pool = {} if reuse else None
            for i, block in enumerate(getattr(self.backbone, name)):
                x = _block(self, block, x, fmt, pool, x_is_free=i > 0 or not feats)  # stage outputs are kept
            feats.append(x)
        return feats


def channels_last_features(backbone: ResNet3d, image: torch.Tensor) -> list[torch.Tensor]:
    """The module's own computation (BatchNorm in its mode, with autograd: training) in channels-last 3D.

    oneDNN runs channels-last convolutions and max pooling faster, forward and backward (a train step's
    backbone 1.3x in float32 and 1.5x in bf16 on a Xeon with AMX, ``benchmarks/README.md``). The stem's
    convolution takes a channels-last copy of its weight: with one input channel the image's layout is
    ambiguous and oneDNN takes the output's from the weight's strides (so a channels-last image alone
    changes nothing); every later layer follows its input. The max pooling runs before the ReLU, on the
    8x smaller tensor: they commute, and so do their gradients (both route a window's gradient to its
    first maximum when that is positive, and give zero otherwise).
    """
    conv = backbone.conv1
    dtype = cpu_autocast_dtype() or image.dtype
    kd, pd = conv.kernel_size[0], conv.padding[0]
    if image.device.type == "cpu" and dtype == torch.bfloat16 and conv.stride[0] == 1 and kd == 2 * pd + 1:
        # bf16 on the CPU: as a 2D convolution over the depth taps (_stem_conv), 2x faster forward and
        # 3x backward than oneDNN's one-channel 3D convolution; in float32 the 3D one is faster
        slab = F.pad(image.to(dtype), (0, 0, 0, 0, pd, pd))
        x = _stem_conv(conv, conv.weight, conv.bias, slab)
    else:
        weight = conv.weight.to(memory_format=torch.channels_last_3d)
        x = F.conv3d(image, weight, conv.bias, conv.stride, conv.padding, conv.dilation)
    x = backbone.bn1(x)
    # CPU autocast would pool in float32, through a float32 copy of the largest activation, and make
    # the residual stream float32 (a cast before every convolution): pool in the activation's dtype,
    # as CUDA autocast does (max is exact in any dtype)
    with torch.autocast("cpu", enabled=False):
        x = backbone.maxpool(x)
    return backbone.stages(backbone.relu(x))
