"""Shared fixtures: a tiny model config, seeded generators, the official reference data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported and when a kernel is decorated. Any test module
# may import triton at collection, long before tests/kernels is reached (monai -> torchvision ->
# torch._dynamo does), so the interpreter is turned on here, first, wherever there is no GPU. Without
# CUDA nothing but the kernel tests runs Triton; with CUDA the kernels compile and run on the GPU.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from visd.config import NormalityConfig, PreprocessConfig, TextConfig, ViSDConfig, VisionConfig  # noqa: E402

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
OFFICIAL = DATA / "official"


def tiny_config(**changes) -> ViSDConfig:
    """A narrow ResNet, a 2-layer text tower on the tiny vocabulary and a small codebook."""
    config = ViSDConfig(
        embed_dim=32,
        attention_heads=2,
        vision=VisionConfig(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), token_dim=32),
        normality=NormalityConfig(hidden_dim=32, dim=48, depth=1, heads=2, head_dim=16, mlp_dim=64, codebook_size=16),
        text=TextConfig(
            vocab_size=417, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, max_length=32,
        ),
        preprocess=PreprocessConfig(roi=(32, 64, 64)),
    )
    return config.replace(**changes) if changes else config


def make_tiny_model(seed: int = 0, **changes):
    from visd import ViSDModel
    from visd.models.text import load_tokenizer

    config = tiny_config(**changes)
    torch.manual_seed(seed)
    model = ViSDModel(config, tokenizer=load_tokenizer(OFFICIAL / "tiny_text", config.text))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not an identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def load_gen_weights():
    spec = importlib.util.spec_from_file_location("gen_weights", OFFICIAL / "gen_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def official_tiny_checkpoint(tmp_path_factory) -> Path:
    """The seed-0 tiny official state dict, saved like the release (a dict with 'model')."""
    sd = load_gen_weights().build_state_dict(OFFICIAL / "official_keys_tiny.tsv", seed=0)
    path = tmp_path_factory.mktemp("official") / "checkpoint.pth"
    torch.save({"model": sd}, path)
    return path


@pytest.fixture(scope="session")
def official_tiny_model(official_tiny_checkpoint):
    from visd import ViSDModel

    return ViSDModel.from_official([official_tiny_checkpoint], OFFICIAL / "tiny_text")


def phantom_volume(shape=(40, 80, 72), seed=0):
    """A preprocessed-looking volume in [0, 1] and a 4-organ label map with organs away from the border."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(shape, generator=g)
    mask = torch.zeros(shape, dtype=torch.int64)
    d, h, w = shape
    mask[4 : d // 2, 6 : h // 2, 6 : w // 2] = 1
    mask[d // 2 : d - 6, h // 2 : h - 8, w // 2 : w - 8] = 2
    mask[6:12, h // 2 : h // 2 + 6, 8:14] = 3
    return image, mask


def save_in_cache(model, name: str) -> Path:
    """Save ``model`` as the converted folder of the named model in the cache (``VISD_HOME``), complete.

    As the registry leaves a finished first use; the assert says when its completion marker changed.
    """
    import json

    from visd.pretrained import MARKER_NAME, cache_folder, cached_folder, get_pretrained

    folder = model.save_pretrained(cache_folder(name))
    (Path(folder) / MARKER_NAME).write_text(json.dumps(get_pretrained(name).fingerprint()))
    assert cached_folder(name) == Path(folder), "the registry's completion marker changed: adapt save_in_cache"
    return Path(folder)
