"""visd: ViSD-Boost, an anatomy-aware vision-language model for 3D CT.

The one obvious way in::

    from visd import ViSDModel
    model = ViSDModel.from_pretrained("visd-boost-ctrate")  # or a folder, or a Hub repo id
    result = model.zero_shot_classify(image, organ_mask)

Everything else lives in subpackages (:mod:`visd.data`, :mod:`visd.zero_shot`, :mod:`visd.training`,
:mod:`visd.evaluation`, :mod:`visd.kernels`) and is optional to learn. Importing :mod:`visd` is
cheap: torch and the model load on first use of a model name.
"""

from typing import TYPE_CHECKING, Any

from visd._version import __version__
from visd.config import FindingSpec, ViSDConfig
from visd.errors import (
    CheckpointMismatchError,
    ConfigError,
    InputError,
    MissingDependencyError,
    VisdError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:
    from visd.models import OrganEmbeddings, ViSDModel, ViSDOutput, ZeroShotResult
    from visd.pretrained import list_pretrained, register_pretrained

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "FindingSpec",
    "InputError",
    "MissingDependencyError",
    "OrganEmbeddings",
    "ViSDConfig",
    "ViSDModel",
    "ViSDOutput",
    "VisdError",
    "WeightsNotFoundError",
    "ZeroShotResult",
    "__version__",
    "list_pretrained",
    "register_pretrained",
]

_LAZY = {"ViSDModel", "OrganEmbeddings", "ViSDOutput", "ZeroShotResult"}
_LAZY_PRETRAINED = {"list_pretrained", "register_pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import visd.models

        return getattr(visd.models, name)
    if name in _LAZY_PRETRAINED:
        import visd.pretrained

        return getattr(visd.pretrained, name)
    raise AttributeError(f"module 'visd' has no attribute {name!r}")
