"""How the image path computes: chosen once per model with :meth:`visd.ViSDModel.set_numerics`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from visd.errors import ConfigError

__all__ = ["NUMERICS_MODES", "Numerics"]

#: ``"fused"``: exact algebra with less work (:mod:`visd.models.fused`), float rounding only;
#: ``"official"``: the authors' operation order, bit for bit on the same CPU kind.
NUMERICS_MODES = ("fused", "official")

_AUTOCAST = (None, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Numerics:
    """The image path's numerics (see ``docs/performance.md``).

    Attributes:
        mode: one of :data:`NUMERICS_MODES`.
        autocast: ``torch.bfloat16`` or ``torch.float16`` to run the fused backbone under autocast
            (not exact: about 1e-2 on probabilities), or None (float32).
        channels_last: run the fused backbone's residual stages in the channels-last 3D format.
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
