"""Finding catalogues: which findings to score, on which organ, with which prompts.

The CT-RATE catalogue of the released model is built in (``model.config.findings``). Your own come
from Python or from a YAML/JSON file holding a list of findings::

    - organ: lung
      name: Emphysema
      negative: [Not Emphysema., No emphysema.]   # several phrasings: a prompt ensemble, averaged
      positive: Emphysema.                        # or one string

Each finding is scored as ``softmax([cos(organ, negative), cos(organ, positive)] / T)[1]``, where a
prompt ensemble is the normalised mean of its phrasings' text embeddings.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from visd.config import FindingSpec
from visd.errors import InputError, did_you_mean

__all__ = ["FindingLike", "as_findings", "load_findings"]

logger = logging.getLogger(__name__)

#: A finding as accepted by :func:`as_findings`: a spec, a dict or an ``(organ, name, negative, positive)`` tuple.
FindingLike = Union[FindingSpec, Mapping[str, Any], Sequence[Any]]

_KEYS = ("organ", "name", "negative", "positive")
_SUFFIXES = (".yaml", ".yml", ".json")


def load_findings(path: str | os.PathLike, organs: Sequence[str] | None = None) -> list[FindingSpec]:
    """Read a finding catalogue from a YAML or JSON file.

    Args:
        path: a ``.yaml``/``.yml``/``.json`` file holding a list of
            ``{organ, name, negative, positive}`` entries; a prompt is a string or a list of strings.
        organs: the organs of the model that will score them (e.g. ``model.organs``); when given,
            an unknown organ is an error with a did-you-mean suggestion.

    Returns:
        The findings, in file order.

    Raises:
        InputError: missing or unreadable file, a syntax error, a missing or unknown key, an empty
            prompt, an unknown organ, a repeated finding name.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"findings file not found: {path}. Expected a YAML or JSON file with a list of findings.")
    if path.suffix.lower() not in _SUFFIXES:
        raise InputError(
            f"unsupported findings file type: {path.name!r}. Expected a file ending in {', '.join(_SUFFIXES)}."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read findings file {path}: {e}. Expected a UTF-8 YAML or JSON file.") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"findings file {path} is not valid JSON: {e}. Fix the syntax.") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise InputError(f"findings file {path} is not valid YAML{at}: {problem}. Fix the syntax.") from e
    if not isinstance(data, list):
        raise InputError(
            f"findings file {path} holds {type(data).__name__}, expected a list of findings, each "
            "{organ, name, negative, positive}. Write one '- organ: ...' entry per finding."
        )
    return as_findings(data, organs, source=str(path))


def as_findings(
    findings: Sequence[FindingLike], organs: Sequence[str] | None = None, source: str = "findings"
) -> list[FindingSpec]:
    """Validate findings given in Python and return them as :class:`~visd.config.FindingSpec` s.

    Args:
        findings: ``FindingSpec`` s, dicts with keys ``organ, name, negative, positive`` or
            ``(organ, name, negative, positive)`` tuples; a prompt is a string or a list of strings.
        organs: the model's organs; when given, each finding's organ must be one of them.
        source: how to name the findings in error messages (e.g. the file).

    Raises:
        InputError: see :func:`load_findings`.
    """
    if isinstance(findings, (str, bytes, Mapping)) or not isinstance(findings, Sequence):
        raise InputError(
            f"{source}: expected a list of findings, got {type(findings).__name__}. "
            "Pass e.g. [('lung', 'Emphysema', 'Not Emphysema.', 'Emphysema.')] or a findings file path."
        )
    if not findings:
        raise InputError(f"{source}: the list of findings is empty. Expected at least one finding.")
    specs = [_one(f, i, organs, source) for i, f in enumerate(findings)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise InputError(
                f"{source}: finding #{i + 1} repeats the name {spec.name!r} of finding #{seen[spec.name] + 1}. "
                "Expected distinct names (they label the result table); rename one."
            )
        seen[spec.name] = i
    return specs


def _one(item: FindingLike, i: int, organs: Sequence[str] | None, source: str) -> FindingSpec:
    where = f"{source}: finding #{i + 1}"
    if isinstance(item, FindingSpec):
        spec = item
    else:
        if isinstance(item, Mapping):
            data = dict(item)
            label = f"{where} ({data.get('name')!r})" if isinstance(data.get("name"), str) else where
            unknown = [k for k in data if k not in _KEYS]
            if unknown:
                raise InputError(
                    f"{label} has unknown key {unknown[0]!r}. Expected the keys {', '.join(_KEYS)}."
                    + did_you_mean(str(unknown[0]), _KEYS)
                )
            missing = [k for k in _KEYS if data.get(k) is None]
            if missing:
                hint = " (a prompt: a string or a list of phrasings)" if missing[0] in ("negative", "positive") else ""
                raise InputError(
                    f"{label} lacks {missing[0]!r}{hint}. Expected the keys {', '.join(_KEYS)}, e.g. "
                    "{organ: lung, name: Emphysema, negative: Not Emphysema., positive: Emphysema.}."
                )
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 4:
            data = dict(zip(_KEYS, item))
            label = f"{where} ({data['name']!r})"
        else:
            raise InputError(
                f"{where} is {item!r:.80}. Expected a FindingSpec, a dict with keys {', '.join(_KEYS)} or an "
                "(organ, name, negative, positive) tuple."
            )
        for key in ("organ", "name"):
            if not isinstance(data[key], str) or not data[key].strip():
                raise InputError(f"{label}: {key!r} must be a non-empty string, got {data[key]!r}.")
        prompts = {key: _prompts(data[key], key, label) for key in ("negative", "positive")}
        spec = FindingSpec(organ=data["organ"].strip(), name=data["name"].strip(), **prompts)
    if organs is not None and spec.organ not in organs:
        raise InputError(
            f"{where} ({spec.name!r}) names organ {spec.organ!r}, which this model does not have. "
            f"Expected one of {list(organs)}.{did_you_mean(spec.organ, organs)}"
        )
    return spec


def _prompts(value: Any, key: str, label: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError(
            f"{label}: {key!r} prompt must be a string or a non-empty list of strings, got {value!r:.80}. "
            f"Give at least one {key} phrasing."
        )
    out = []
    for p in items:
        if not isinstance(p, str) or not p.strip():
            raise InputError(
                f"{label}: {key!r} prompts must be non-empty strings, got {p!r:.80}. Remove it or write the phrasing."
            )
        out.append(p.strip())
    return tuple(out)
