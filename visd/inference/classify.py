"""Zero-shot scoring: prompt embeddings (cached) and per-finding probabilities, the model an argument.

A finding is scored as ``softmax([cos(organ, negative), cos(organ, positive)] / T)[1]``; a prompt
ensemble (several phrasings) is the normalised mean of its phrasings' embeddings.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from visd.config import FindingLike, FindingSpec, as_findings
from visd.inference.volume import encode_volume
from visd.models.image_path import weights_fingerprint
from visd.models.outputs import FindingScore, ZeroShotResult
from visd.models.windows import Status

__all__ = ["clear_prompt_cache", "prompt_embeddings", "zero_shot_classify"]

# model -> (weights fingerprint, {prompts: (P, E) embeddings}); entries go with their model
_PROMPT_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def clear_prompt_cache() -> None:
    """Forget every cached prompt embedding (benchmarks time the text tower with it)."""
    _PROMPT_CACHE.clear()


def _encoded_prompts(model: Any, prompts: tuple[str, ...]) -> torch.Tensor:
    """``(P, E)`` normalised embeddings of ``prompts``, cached while the text tower's weights are
    unchanged and it is in eval mode (dropout makes train-mode embeddings random)."""
    if model.text.training:
        with torch.no_grad():
            return model.encode_text(list(prompts))
    key = weights_fingerprint(model.text)
    entry = _PROMPT_CACHE.get(model)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _PROMPT_CACHE[model] = entry
    cache = entry[1]
    if prompts not in cache:
        with torch.no_grad():
            cache[prompts] = model.encode_text(list(prompts))
    return cache[prompts]


def prompt_embeddings(model: Any, findings: Sequence[FindingSpec]) -> torch.Tensor:
    """``(F, 2, E)`` normalised [negative, positive] text embeddings; several phrasings are averaged."""
    prompts = tuple(p for f in findings for p in (*f.negative, *f.positive))
    encoded = _encoded_prompts(model, prompts)
    rows, i = [], 0
    for f in findings:
        pair = []
        for n in (len(f.negative), len(f.positive)):
            e = encoded[i : i + n]
            pair.append(e[0] if n == 1 else F.normalize(e.mean(0), dim=-1))
            i += n
        rows.append(torch.stack(pair))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_classify(
    model: Any, image: Any, organ_mask: Any, findings: Sequence[FindingLike] | None = None, **volume_options: Any
) -> ZeroShotResult:
    """Zero-shot diagnosis of a preprocessed volume by the official per-volume procedure.

    Args:
        model: a :class:`visd.ViSDModel`.
        image: ``(D, H, W)`` or ``(1, D, H, W)`` preprocessed volume, values in [0, 1].
        organ_mask: same shape, organ labels (``config.organs[i]`` has value ``i + 1``).
        findings: ``FindingSpec`` s, dicts or ``(organ, name, negative, positive)`` tuples
            (prompts a string or a list of phrasings); default: the model's catalogue.
        volume_options: passed to :func:`visd.inference.encode_volume` (``window_batch_size``).

    Returns:
        Per finding, the organ and the positive-class probability (NaN with the reason when the
        organ was not scored).
    """
    specs = list(model.config.findings) if findings is None else as_findings(findings, model.organs)
    organs = tuple(dict.fromkeys(f.organ for f in specs))
    emb = encode_volume(model, image, organ_mask, organs=organs, **volume_options)
    text = prompt_embeddings(model, specs)
    scores = []
    for spec, pair in zip(specs, text):
        status = emb.status[spec.organ]
        prob = float("nan")
        if status == Status.SCORED:
            logits = emb[spec.organ] @ pair.t() / model.temperature
            prob = float(torch.softmax(logits, dim=-1)[1])
        scores.append(FindingScore(spec.organ, spec.name, prob, status))
    return ZeroShotResult(scores, emb)
