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
from collections.abc import Sequence
from pathlib import Path

from visd.config import FindingLike, FindingSpec, as_findings
from visd.errors import InputError

# FindingLike and as_findings live beside FindingSpec in visd.config; they are re-exported here
__all__ = ["FindingLike", "as_findings", "load_findings"]

logger = logging.getLogger(__name__)

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
