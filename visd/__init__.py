"""visd: ViSD-Boost, an anatomy-aware vision-language model for 3D CT.

The one obvious way in::

    from visd import ViSDModel
    model = ViSDModel.from_pretrained("path/or/org-name")
    result = model.zero_shot_classify(image, organ_mask)

Everything else lives in subpackages (:mod:`visd.data`, :mod:`visd.zero_shot`, :mod:`visd.training`,
:mod:`visd.evaluation`, :mod:`visd.kernels`) and is optional to learn.
"""

from visd._version import __version__
from visd.config import ViSDConfig
from visd.errors import (
    CheckpointMismatchError,
    ConfigError,
    InputError,
    MissingDependencyError,
    VisdError,
    WeightsNotFoundError,
)

__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "InputError",
    "MissingDependencyError",
    "ViSDConfig",
    "VisdError",
    "WeightsNotFoundError",
    "__version__",
]
