"""fVLM's rule that turns organ-split report sentences into one training text per organ.

For each organ (fVLM's released ``CaptionDataset``):

1. the impression (conclusion) sentence and the findings (description) sentence each get a final
   ``"."`` if they lack one;
2. an organ with no impression sentence is **normal**; its impression is replaced by
   ``"<organ> shows no significant abnormalities."``;
3. the text is impression + findings, concatenated without a space;
4. double quotes, single quotes and parentheses are removed.

An organ's text is abnormal exactly when it does not start with the normal sentence.
Deviation from fVLM: an empty or whitespace-only sentence counts as missing (fVLM would turn an
empty impression into ``"."`` and call the organ abnormal).
"""

from __future__ import annotations

__all__ = ["normal_sentence", "organ_text", "is_abnormal_text"]

_REMOVED = str.maketrans("", "", "\"'()")


def normal_sentence(organ: str) -> str:
    """``"<organ> shows no significant abnormalities."``, fVLM's text of a normal organ."""
    return f"{organ} shows no significant abnormalities."


def _sentence(text: str | None) -> str:
    if text is None or not str(text).strip():
        return ""
    text = str(text)
    return text if text.endswith(".") else text + "."


def organ_text(organ: str, impression: str | None, findings: str | None) -> str:
    """The training text of one organ from its impression and findings sentences (either may be None)."""
    conc = _sentence(impression) or normal_sentence(organ)
    return (conc + _sentence(findings)).translate(_REMOVED)


def is_abnormal_text(organ: str, text: str) -> bool:
    """fVLM's label: abnormal unless the text starts with :func:`normal_sentence`."""
    return not text.startswith(normal_sentence(organ))
