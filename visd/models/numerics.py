"""How the image path computes: chosen once per model with :meth:`visd.ViSDModel.set_numerics`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visd.errors import ConfigError

__all__ = ["NUMERICS_CHOICES", "NUMERICS_MODES", "Numerics", "native_bf16", "numerics_for"]

#: ``"fused"``: exact algebra with less work (:mod:`visd.models.fused`), float rounding only;
#: ``"official"``: the authors' operation order, bit for bit on the same CPU kind.
NUMERICS_MODES = ("fused", "official")

#: What ``visd diagnose --numerics`` and :func:`numerics_for` accept.
NUMERICS_CHOICES = ("fused", "fused-bf16", "official", "auto")

_AUTOCAST = (None, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Numerics:
    """The image path's numerics (see ``docs/performance.md``).

    Attributes:
        mode: one of :data:`NUMERICS_MODES`.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run the fused backbone under autocast
            (not exact: about 1e-2 on probabilities), or None (float32).
        channels_last: run the fused backbone in the channels-last 3D format (inference: its residual
            stages; training: all of it).
    """

    mode: str = "fused"
    autocast: torch.dtype | None = None
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.mode not in NUMERICS_MODES:
            raise ConfigError(f"numerics mode must be one of {NUMERICS_MODES}, got {self.mode!r}")
        if self.autocast not in _AUTOCAST:
            raise ConfigError(f"autocast must be torch.bfloat16, torch.float16 or None, got {self.autocast!r}")
        if self.mode == "official" and (self.autocast is not None or not self.channels_last):
            raise ConfigError(
                "autocast and channels_last are options of the fused numerics; the official order runs "
                "the authors' float32 operations as they are. Use set_numerics('official') alone."
            )

    def describe(self) -> str:
        """A short label, e.g. ``"fused"``, ``"fused-bf16"`` or ``"official"`` (recorded in results)."""
        label = self.mode
        if self.autocast is not None:
            label += "-" + {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast]
        if self.mode == "fused" and not self.channels_last:
            label += "-nocl"
        return label


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16 (elsewhere bf16 is emulated and brings no speed)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe is not None and bool(probe()) for probe in probes)


def numerics_for(choice: str, device: str | torch.device) -> tuple[Numerics, str]:
    """The :class:`Numerics` of a :data:`NUMERICS_CHOICES` entry on ``device``, and why (for the log).

    ``"auto"`` is ``fused-bf16`` where :func:`native_bf16` holds and ``fused`` elsewhere: bf16 only
    where it pays, and never silently (results record ``Numerics.describe()``).
    """
    if choice not in NUMERICS_CHOICES:
        raise ConfigError(f"numerics must be one of {NUMERICS_CHOICES}, got {choice!r}")
    if choice == "auto":
        if native_bf16(device):
            return Numerics("fused", torch.bfloat16), f"auto: {torch.device(device).type} computes bf16 natively"
        return Numerics("fused"), f"auto: no native bf16 on {torch.device(device).type}"
    if choice == "fused-bf16":
        return Numerics("fused", torch.bfloat16), "asked for"
    return Numerics(choice), "asked for"
