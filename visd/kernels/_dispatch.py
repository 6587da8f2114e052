"""Backend choice and argument validation for the public kernel functions.

Nothing here imports triton at import time: the Triton modules are imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from types import ModuleType

import torch

from visd.errors import InputError, MissingDependencyError, did_you_mean

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (*TRITON_DTYPES, torch.float64)


def check_backend(backend: object) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise a did-you-mean InputError."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(
            f"unknown kernel backend: {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}."
            f"{did_you_mean(str(backend), BACKENDS)}"
        )
    return backend


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def load_triton_module(name: str) -> ModuleType:
    """Import ``visd.kernels.<name>`` (which imports triton); MissingDependencyError if triton is absent."""
    if not _triton_installed():
        raise MissingDependencyError(
            "backend='triton' needs the 'triton' package, which is not installed. "
            "Install it (pip install triton; it ships with CUDA builds of torch) or use backend='reference'."
        )
    try:
        return importlib.import_module(f"visd.kernels.{name}")
    except ImportError as e:
        raise MissingDependencyError(
            f"backend='triton' could not import triton: {e}. Reinstall triton or use backend='reference'."
        ) from e


def use_triton(backend: str, device: torch.device, module_name: str, unsupported: str | None) -> bool:
    """Decide between Triton (True) and the reference (False) for tensors on ``device``.

    ``unsupported`` is ``None`` when the Triton kernel can handle these arguments, else the
    reason it cannot: ``"auto"`` then falls back to the reference and ``"triton"`` raises.
    """
    if backend == "reference":
        return False
    if backend == "auto":
        return device.type == "cuda" and unsupported is None and _triton_installed()
    if unsupported is not None:
        raise InputError(f"backend='triton' cannot run these arguments: {unsupported}. Use backend='auto' or 'reference'.")
    if device.type not in ("cuda", "cpu"):
        raise InputError(
            f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got device "
            f"{str(device)!r}. Move the tensors to CUDA or use backend='reference'."
        )
    module = load_triton_module(module_name)
    if device.type == "cpu" and not module.interpreted():
        raise InputError(
            "backend='triton' got CPU tensors, but Triton runs on the CPU only through its interpreter, "
            "which is off. Set the environment variable TRITON_INTERPRET=1 before visd first uses a Triton "
            "kernel (e.g. `TRITON_INTERPRET=1 python ...`), move the tensors to CUDA, or use backend='reference'."
        )
    return True


def _check_tensor(name: str, value: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(value).__name__}.")
    if value.dim() != ndim:
        raise InputError(f"{name} must have shape {shape_doc}, got shape {tuple(value.shape)}.")
    return value


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64. "
            f"Cast it with .float()."
        )


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise InputError(
            f"{name} and {ref_name} are on different devices: {t.device} and {ref.device}. Move them to one device."
        )
    if dtype and t.dtype != ref.dtype:
        raise InputError(
            f"{name} and {ref_name} differ in dtype: {t.dtype} and {ref.dtype}. Cast them to one dtype."
        )


def validate_pool_args(x_a, x_b, offsets, u_a, u_b, scale) -> tuple[torch.Tensor, float]:
    """Check the arguments of ``segment_softmax_pool``; return int64 offsets and the scale as float."""
    x_a = _check_tensor("x_a", x_a, 2, "(N, Fa)")
    _check_float("x_a", x_a)
    n = x_a.shape[0]
    if x_b is not None:
        x_b = _check_tensor("x_b", x_b, 2, "(N, Fb)")
        _check_same("x_b", x_b, "x_a", x_a)
        if x_b.shape[0] != n:
            raise InputError(
                f"x_a and x_b differ in number of rows: {n} and {x_b.shape[0]}. Row i of both must be the same token."
            )
    offsets = _check_tensor("offsets", offsets, 1, "(S + 1,)")
    if offsets.dtype not in (torch.int32, torch.int64) or offsets.numel() == 0:
        raise InputError(
            f"offsets must be a non-empty int32/int64 tensor of S + 1 segment boundaries, got dtype "
            f"{offsets.dtype} with {offsets.numel()} elements. Build it with torch.cumsum of the segment sizes, "
            f"prefixed by 0."
        )
    _check_same("offsets", offsets, "x_a", x_a, dtype=False)
    num_segments = offsets.numel() - 1
    u_a = _check_tensor("u_a", u_a, 3, "(S, H, Fa)")
    _check_same("u_a", u_a, "x_a", x_a)
    if u_a.shape[0] != num_segments or u_a.shape[2] != x_a.shape[1] or u_a.shape[1] < 1:
        raise InputError(
            f"u_a has shape {tuple(u_a.shape)}; expected (S, H, Fa) = ({num_segments}, H >= 1, {x_a.shape[1]}) "
            f"from offsets (S + 1 = {offsets.numel()}) and x_a {tuple(x_a.shape)}."
        )
    if (x_b is None) != (u_b is None):
        raise InputError(
            f"x_b and u_b must be given together: got x_b={'None' if x_b is None else 'a tensor'} and "
            f"u_b={'None' if u_b is None else 'a tensor'}."
        )
    if u_b is not None:
        u_b = _check_tensor("u_b", u_b, 3, "(S, H, Fb)")
        _check_same("u_b", u_b, "x_a", x_a)
        expected = (num_segments, u_a.shape[1], x_b.shape[1])
        if tuple(u_b.shape) != expected:
            raise InputError(
                f"u_b has shape {tuple(u_b.shape)}; expected (S, H, Fb) = {expected} from offsets, u_a "
                f"{tuple(u_a.shape)} and x_b {tuple(x_b.shape)}."
            )
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise InputError(f"scale must be a finite real number, got {scale!r}.")
    _check_offset_values(offsets, n)
    return offsets.to(torch.int64), float(scale)


def _check_offset_values(offsets: torch.Tensor, n: int) -> None:
    """offsets[0] == 0, non-decreasing, offsets[-1] == N; one device sync on the happy path."""
    o = offsets.to(torch.int64)
    decreasing = (o[1:] < o[:-1]).any()
    first, last, bad = (int(v) for v in torch.stack([o[0], o[-1], decreasing.to(torch.int64)]).tolist())
    if first != 0:
        raise InputError(f"offsets must start at 0, got offsets[0] = {first}. Prefix the cumulative sizes with 0.")
    if bad:
        i = int(torch.nonzero(o[1:] < o[:-1])[0, 0])
        raise InputError(
            f"offsets must be non-decreasing, got offsets[{i}] = {int(o[i])} > offsets[{i + 1}] = {int(o[i + 1])}. "
            f"Segment sizes must be >= 0."
        )
    if last != n:
        raise InputError(
            f"offsets must end at the number of rows N = {n}, got offsets[-1] = {last}. "
            f"Every row must belong to exactly one segment."
        )


# Padded heads x padded features (Fa + Fb) that one Triton pooling program holds in registers.
POOL_MAX_TILE = 16 * 1024


def _pad(n: int) -> int:
    """Smallest power of two >= n and >= 16, as the Triton kernels pad their tiles."""
    return max(16, 1 << max(0, n - 1).bit_length())


def pool_unsupported(x_a: torch.Tensor, x_b: torch.Tensor | None, u_a: torch.Tensor) -> str | None:
    """Why the Triton pooling kernel cannot take these (validated) arguments, or ``None``."""
    if x_a.dtype not in TRITON_DTYPES:
        return f"dtype {x_a.dtype} (the Triton kernel takes float16, bfloat16, float32)"
    fb = 0 if x_b is None else x_b.shape[1]
    tile = _pad(u_a.shape[1]) * (_pad(x_a.shape[1]) + (_pad(fb) if fb else 0))
    if tile > POOL_MAX_TILE:
        return (
            f"H = {u_a.shape[1]}, Fa = {x_a.shape[1]}, Fb = {fb} need {tile} accumulator elements per "
            f"segment, more than the kernel's {POOL_MAX_TILE}"
        )
    return None


def validate_code_args(z, codebook) -> None:
    """Check the arguments of ``nearest_code``."""
    z = _check_tensor("z", z, 2, "(N, D)")
    codebook = _check_tensor("codebook", codebook, 2, "(K, D)")
    _check_float("z", z)
    _check_float("codebook", codebook)
    _check_same("codebook", codebook, "z", z, dtype=False)
    if codebook.shape[0] == 0:
        raise InputError("codebook is empty (K = 0); a nearest code needs at least one code vector.")
    if codebook.shape[1] != z.shape[1]:
        raise InputError(
            f"z and codebook differ in feature size: z {tuple(z.shape)}, codebook {tuple(codebook.shape)}; "
            f"expected (N, D) and (K, D)."
        )
