"""Inference procedures that take the model as an argument: the per-volume windows and zero-shot scoring."""

from visd.inference.classify import (
    clear_prompt_cache,
    prompt_embeddings,
    zero_shot_classify,
)
from visd.inference.volume import DEFAULT_WINDOW_BATCH, encode_volume, window_batches
from visd.inference.windows import OrganWindow, organ_window

__all__ = [
    "DEFAULT_WINDOW_BATCH",
    "OrganWindow",
    "clear_prompt_cache",
    "encode_volume",
    "organ_window",
    "prompt_embeddings",
    "window_batches",
    "zero_shot_classify",
]
