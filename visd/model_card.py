"""The ``README.md`` model card written with the weights, with Hugging Face Hub metadata.

The metadata block is a :class:`huggingface_hub.ModelCardData`, so the Hub shows the licence, the
base model, the training data set, the pipeline and any evaluation results (``model-index``), and
``huggingface_hub.ModelCard.load`` reads it back. The body states what a user needs to run the model
correctly: the organs and their label values, the preprocessing spec stored in ``config.json``, the
numerics, the zero-shot findings, and how to cite the paper.

The card is built from the config alone (hub code never imports the model class).
"""

from __future__ import annotations

from collections.abc import Sequence

from visd.config import ViSDConfig

__all__ = ["BASE_MODEL", "CITATION", "TRAINING_DATASET", "card_data", "eval_results_from", "model_card"]

# The text encoder the released model starts from (its BERT weights, vocabulary and tokenizer).
BASE_MODEL = "microsoft/BiomedVLP-CXR-BERT-specialized"
# The chest CT / report data set the released model was trained on.
TRAINING_DATASET = "ibrahimhamamci/CT-RATE"
PIPELINE_TAG = "zero-shot-image-classification"
# The authors' BibTeX, as their README gives it (alibaba-damo-academy/ViSD-Boost).
CITATION = """@inproceedings{cao2025boosting,
  title={Boosting vision semantic density with anatomy normality modeling for medical vision-language pre-training},
  author={Cao, Weiwei and Zhang, Jianpeng and Shui, Zhongyi and Wang, Sinuo and Chen, Zeli and Li, Xi and Lu, Le and Ye, Xianghua and Zhang, Qi and Liang, Tingbo and others},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision},
  pages={23041--23050},
  year={2025}
}"""


def card_data(config: ViSDConfig, eval_results: Sequence[object] | None = None) -> "ModelCardData":  # noqa: F821
    """The Hub metadata of a model with this config.

    Args:
        config: the model config (organs, preprocessing, findings).
        eval_results: ``huggingface_hub.EvalResult`` s to publish (for instance the per-finding AUCs of
            ``visd evaluate`` on CT-RATE); ``None`` when no evaluation is known.

    Returns:
        A ``huggingface_hub.ModelCardData`` with licence, base model, data set, pipeline tag and tags.
    """
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="visd",
        license="other",
        # The authors' repository states no licence for the weights (see the registry entry); the
        # training data's terms are those of CT-RATE, linked here.
        license_name="unspecified",
        license_link=f"https://huggingface.co/datasets/{TRAINING_DATASET}",
        base_model=BASE_MODEL,
        datasets=[TRAINING_DATASET],
        pipeline_tag=PIPELINE_TAG,
        tags=["medical-imaging", "ct", "vision-language", "zero-shot", "3d"],
        metrics=["roc_auc"] if eval_results else None,
        model_name="ViSD-Boost (visd)",
        eval_results=list(eval_results) if eval_results else None,
    )


def model_card(config: ViSDConfig, eval_results: Sequence[object] | None = None) -> str:
    """The text of ``README.md``: YAML metadata (:func:`card_data`) and the body described above."""
    from huggingface_hub import ModelCard

    data = card_data(config, eval_results)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(config, eval_results)}")
    return str(card)


def eval_results_from(
    evaluation: object, *, dataset_name: str = "CT-RATE", dataset_type: str = TRAINING_DATASET,
    dataset_split: str | None = "validation",
) -> list:
    """``huggingface_hub.EvalResult`` s of a :func:`visd.evaluation.evaluate` outcome, for :func:`model_card`.

    The overall mean AUC, weighted F1 and accuracy (the papers' summary numbers, at the official
    threshold rule), then the AUC of each finding; findings with NaN metrics are left out.
    """
    import math

    from huggingface_hub import EvalResult

    table = evaluation.table  # type: ignore[attr-defined]
    common = {"task_type": PIPELINE_TAG, "dataset_type": dataset_type, "dataset_name": dataset_name,
              "dataset_split": dataset_split}
    overall = table[table["kind"] == "overall"].iloc[0]
    results = [
        EvalResult(metric_type=kind, metric_name=f"mean {label}", metric_value=round(float(overall[column]), 4), **common)
        for column, kind, label in (("auc", "roc_auc", "AUC"), ("f1_weighted", "f1", "F1 (weighted)"),
                                    ("accuracy", "accuracy", "accuracy"))
        if not math.isnan(float(overall[column]))
    ]
    for name, row in table[table["kind"] == "finding"].iterrows():
        if not math.isnan(float(row["auc"])):
            results.append(EvalResult(metric_type="roc_auc", metric_name=f"AUC {name}",
                                      metric_value=round(float(row["auc"]), 4), **common))
    return results


def _body(config: ViSDConfig, eval_results: Sequence[object] | None) -> str:
    c, p = config, config.preprocess
    organs = ", ".join(c.organs)
    labels = ", ".join(f"{i + 1} = {o}" for i, o in enumerate(c.organs))
    merge = "; ".join(f"{organ} = {' + '.join(names)}" for organ, names in c.totalsegmentator_map.items())
    findings = "\n".join(
        f"| {f.organ} | {f.name} | {' / '.join(f.negative)} | {' / '.join(f.positive)} |" for f in c.findings
    )
    results = _results_table(eval_results)
    return f"""
# ViSD-Boost model (visd)

An anatomy-aware CT vision-language model (ViSD-Boost, ICCV 2025) packaged with
[visd](https://pypi.org/project/visd/): a 3D ResNet vision encoder with per-organ query pooling and a
normality VQ-VAE, aligned with a BERT text encoder (started from `{BASE_MODEL}`), for zero-shot
findings per organ from a CT in Hounsfield units and an organ label map.

```python
from visd import ViSDModel
model = ViSDModel.from_pretrained("this/folder-or-repo")
```

## Inputs
- organs (label value = position + 1): {organs} ({labels})
- organ masks from TotalSegmentator v2, task `total`, merged by class name: {merge}
- embedding size: {c.embed_dim}; text tower: BERT, {c.text.num_hidden_layers} layers, hidden {c.text.hidden_size},
  at most {c.text.max_length} tokens

## Preprocessing (stored in `config.json`, applied by visd)
- orientation {p.orientation}, spacing (D, H, W) {p.spacing} mm (official x/y spacing swap: {p.swap_xy_spacing})
- HU window {p.hu_window} scaled to [0, 1], clipped; crop margin (D, H, W) {p.crop_margin} voxels around the organs
- ROI (D, H, W) {p.roi}, pad value {p.pad_value}; windows zero-padded at the end to multiples of (16, 32, 32)

## Numerics
float32 weights (safetensors). The default fused numerics match the official computation within 1e-5 on
organ embeddings and probabilities; `model.set_numerics("official")` reproduces the official organ
embeddings bit for bit on CPU. Zero-shot probability = softmax over (negative, positive) prompt
similarities divided by the learnt temperature.

## Zero-shot findings
| organ | finding | negative prompt(s) | positive prompt(s) |
|---|---|---|---|
{findings}

## Evaluation
{results}

## Intended use and limits
Research use only; not a medical device. Trained on chest CT with radiology reports (CT-RATE); other
body regions, contrast phases or populations may behave differently. The licence of the weights
follows the terms of their training data (CT-RATE: non-commercial, see the link in the metadata).

## Citation
```bibtex
{CITATION}
```
"""


def _results_table(eval_results: Sequence[object] | None) -> str:
    if not eval_results:
        return "No evaluation results were recorded with these weights (run `visd evaluate` to measure them)."
    rows = "\n".join(
        f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name or r.metric_type} | {r.metric_value} |"
        for r in eval_results
    )
    return f"| data set | split | metric | value |\n|---|---|---|---|\n{rows}"
