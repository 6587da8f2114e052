"""The public surface is deliberate: changing it must change this test."""

import subprocess
import sys

import visd


def test_all_is_pinned():
    assert sorted(visd.__all__) == [
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
    for name in visd.__all__:
        assert getattr(visd, name) is not None


def test_import_is_cheap_and_has_no_side_effects():
    code = "import sys, logging, visd; print('torch' in sys.modules, logging.getLogger().handlers == [])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_errors_inherit_builtins():
    assert issubclass(visd.InputError, ValueError) and issubclass(visd.InputError, visd.VisdError)
    assert issubclass(visd.WeightsNotFoundError, FileNotFoundError)
    assert issubclass(visd.CheckpointMismatchError, RuntimeError)
    assert issubclass(visd.MissingDependencyError, ImportError)
