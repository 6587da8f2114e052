"""Model configuration: strict, frozen pydantic configs saved with the weights as ``config.json``.

A config is data. Unknown keys are errors, values are validated, and the preprocessing spec and
organ list travel with the weights so a checkpoint never meets the wrong transform.
Training settings live elsewhere (:mod:`visd.training`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from visd.errors import ConfigError, InputError, did_you_mean

__all__ = [
    "SCHEMA_VERSION",
    "VisionConfig",
    "NormalityConfig",
    "TextConfig",
    "PreprocessConfig",
    "FindingSpec",
    "FindingLike",
    "as_findings",
    "ViSDConfig",
]

SCHEMA_VERSION = 1


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied and re-validated (``model_copy`` does not validate)."""
        data = self.model_dump()
        data.update(changes)
        try:
            return type(self).model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"invalid {type(self).__name__} override {changes}: {e}") from e


class VisionConfig(_Config):
    """The 3D ResNet backbone (MedicalNet-style, shortcut A) and its four token projections."""

    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    dilations: tuple[int, int, int, int] = (1, 1, 2, 4)
    in_channels: int = Field(1, ge=1)
    token_dim: int = Field(256, ge=1)


class NormalityConfig(_Config):
    """The normality VQ-VAE on level-4 organ tokens."""

    hidden_dim: int = Field(512, ge=1)
    dim: int = Field(768, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(16, ge=1)
    head_dim: int = Field(64, ge=1)
    mlp_dim: int = Field(2048, ge=1)
    codebook_size: int = Field(400, ge=1)
    decay: float = Field(0.99, gt=0.0, lt=1.0)
    eps: float = Field(1e-5, gt=0.0)
    commitment_cost: float = Field(0.25, ge=0.0)


class TextConfig(_Config):
    """The BERT text tower (the fields of a transformers ``BertConfig`` that matter) and tokenizer."""

    vocab_size: int = Field(30522, ge=1)
    hidden_size: int = Field(768, ge=1)
    num_hidden_layers: int = Field(12, ge=1)
    num_attention_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=1)
    max_position_embeddings: int = Field(512, ge=1)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = Field(0.1, ge=0.0, le=1.0)
    attention_probs_dropout_prob: float = Field(0.1, ge=0.0, le=1.0)
    pad_token_id: int = 0
    do_lower_case: bool = True
    max_length: int = Field(384, ge=2, description="Prompts and reports are truncated to this many tokens.")

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text.hidden_size ({self.hidden_size}) must be divisible by "
                f"text.num_attention_heads ({self.num_attention_heads})"
            )
        if self.max_length > self.max_position_embeddings:
            raise ValueError(
                f"text.max_length ({self.max_length}) exceeds text.max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        return self


class PreprocessConfig(_Config):
    """How a CT in Hounsfield units becomes model input; see ``docs/ct_conventions.md``.

    Axes are (D, H, W) = (z, y, x) after preprocessing; ``spacing`` is in mm in that order.
    """

    orientation: Literal["LPS"] = "LPS"
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    hu_window: tuple[float, float] = (-1150.0, 350.0)
    crop_margin: tuple[int, int, int] = (5, 20, 20)
    roi: tuple[int, int, int] = (112, 256, 352)
    pad_value: float = 0.0
    swap_xy_spacing: bool = Field(
        True, description="Reproduce the official resize, which swaps the x and y spacings."
    )

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        lo, hi = self.hu_window
        if not lo < hi:
            raise ValueError(f"preprocess.hu_window must be (low, high) with low < high, got {self.hu_window}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"preprocess.spacing must be positive, got {self.spacing}")
        stride = (16, 32, 32)
        if any(r % s for r, s in zip(self.roi, stride)):
            raise ValueError(f"preprocess.roi {self.roi} must be a multiple of the token stride {stride}")
        return self


class FindingSpec(_Config):
    """One zero-shot finding: an organ, a name and its prompts (several phrasings are averaged)."""

    organ: str
    name: str
    negative: tuple[str, ...]
    positive: tuple[str, ...]

    @field_validator("negative", "positive", mode="before")
    @classmethod
    def _one_prompt_is_a_tuple(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "FindingSpec":
        if not self.negative or not self.positive:
            raise ValueError(f"finding {self.name!r} needs at least one negative and one positive prompt")
        return self


# -- findings given in Python: coerced into FindingSpec ---------------------------------------------
#: A finding as accepted by :func:`as_findings`: a spec, a dict or an ``(organ, name, negative, positive)`` tuple.
FindingLike = Union[FindingSpec, Mapping[str, Any], Sequence[Any]]

_KEYS = ("organ", "name", "negative", "positive")


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
        InputError: not a list, an empty list, a missing or unknown key, an empty prompt, an unknown
            organ, a repeated finding name. (Reading them from a file: :func:`visd.zero_shot.load_findings`.)
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

def _ct_rate_findings() -> tuple[FindingSpec, ...]:
    items = [
        ("lung", "Emphysema", None),
        ("lung", "Atelectasis", "Atelectatic"),
        ("lung", "Lung nodule", None),
        ("lung", "Lung opacity", None),
        ("lung", "Pulmonary fibrotic sequela", "Pulmonary fibrotic"),
        ("lung", "Pleural effusion", None),
        ("lung", "Mosaic attenuation pattern", None),
        ("lung", "Peribronchial thickening", None),
        ("lung", "Consolidation", None),
        ("lung", "Bronchiectasis", None),
        ("lung", "Interlobular septal thickening", None),
        ("heart", "Cardiomegaly", None),
        ("heart", "Pericardial effusion", None),
        ("heart", "Coronary artery wall calcification", None),
        ("esophagus", "Hiatal hernia", None),
        ("aorta", "Arterial wall calcification", None),
    ]
    return tuple(
        FindingSpec(organ=o, name=n, negative=(f"Not {p or n}.",), positive=(f"{p or n}.",)) for o, n, p in items
    )


CHEST_ORGANS = ("lung", "heart", "esophagus", "aorta")
CHEST_TOTALSEGMENTATOR_MAP = {
    "lung": (
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    ),
    "heart": ("heart", "atrial_appendage_left"),
    "esophagus": ("esophagus",),
    "aorta": ("aorta",),
}


class ViSDConfig(_Config):
    """Everything needed to build a ViSD model and feed it correctly.

    ``organs[i]`` has label value ``i + 1`` in an organ label map (0 is background).
    """

    schema_version: int = SCHEMA_VERSION
    embed_dim: int = Field(256, ge=1)
    attention_heads: int = Field(4, ge=1)
    temperature: float = Field(0.07, gt=0.0, description="Initial logit temperature (cos / temperature).")
    organs: tuple[str, ...] = CHEST_ORGANS
    vision: VisionConfig = VisionConfig()
    normality: NormalityConfig = NormalityConfig()
    text: TextConfig = TextConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    findings: tuple[FindingSpec, ...] = Field(default_factory=_ct_rate_findings)
    totalsegmentator_map: dict[str, tuple[str, ...]] = Field(default_factory=lambda: dict(CHEST_TOTALSEGMENTATOR_MAP))
    min_organ_fraction: float = Field(
        0.9, ge=0.0, le=1.0, description="A non-target organ with less of its volume in a window is not scored."
    )

    @model_validator(mode="after")
    def _check(self) -> "ViSDConfig":
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {SCHEMA_VERSION}; load files with ViSDConfig.from_file")
        if not self.organs or len(set(self.organs)) != len(self.organs):
            raise ValueError(f"organs must be a non-empty list of distinct names, got {self.organs}")
        if len(self.organs) > 255:
            raise ValueError(f"at most 255 organs are supported (labels are stored as uint8), got {len(self.organs)}")
        if self.embed_dim % self.attention_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.vision.token_dim != self.embed_dim:
            raise ValueError(
                f"vision.token_dim ({self.vision.token_dim}) must equal embed_dim ({self.embed_dim})"
            )
        if self.normality.codebook_size < len(self.organs):
            raise ValueError(
                f"normality.codebook_size ({self.normality.codebook_size}) is smaller than the number of organs "
                f"({len(self.organs)})"
            )
        for f in self.findings:
            if f.organ not in self.organs:
                raise ValueError(f"finding {f.name!r} names organ {f.organ!r}, which is not in organs {self.organs}")
        for organ in self.totalsegmentator_map:
            if organ not in self.organs:
                raise ValueError(f"totalsegmentator_map names organ {organ!r}, which is not in organs {self.organs}")
        return self

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViSDConfig":
        """Validate a dict (migrating older schema versions); raises :class:`ConfigError`."""
        try:
            return cls.model_validate(_migrate(dict(data)))
        except ValidationError as e:
            raise ConfigError(f"invalid visd config: {e}") from e

    @classmethod
    def from_file(cls, path: str | Path) -> "ViSDConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}. Expected a visd config.json.") from e
        if not isinstance(data, dict):
            raise ConfigError(f"model config {path} holds {type(data).__name__}, expected a JSON object")
        return cls.from_dict(data)


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a config dict of any known schema version to :data:`SCHEMA_VERSION`."""
    version = data.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"config schema_version {version} is newer than this visd supports ({SCHEMA_VERSION}); upgrade visd"
        )
    data["schema_version"] = SCHEMA_VERSION
    return data

