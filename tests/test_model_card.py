"""The README.md model card: Hub metadata read back with huggingface_hub, and the config's facts in the body."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard

from visd.model_card import BASE_MODEL, CITATION, TRAINING_DATASET, model_card

from tests.conftest import make_tiny_model, tiny_config


def test_saved_card_metadata_reads_back(tmp_path):
    model = make_tiny_model(seed=1)
    folder = model.save_pretrained(tmp_path / "model")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "visd" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.base_model == "microsoft/BiomedVLP-CXR-BERT-specialized" == BASE_MODEL
    assert data.datasets == ["ibrahimhamamci/CT-RATE"] == [TRAINING_DATASET]
    assert data.license == "other" and data.license_link.endswith(TRAINING_DATASET)
    assert data.eval_results is None and "No evaluation results" in card.text
    assert CITATION.splitlines()[1] in card.text and "ICCV" in card.text
    # saving twice gives the same bytes (push_to_hub of an unchanged model uploads nothing)
    again = model.save_pretrained(tmp_path / "again")
    assert (again / "README.md").read_bytes() == (folder / "README.md").read_bytes()


def test_card_states_the_config_preprocessing():
    config = tiny_config().replace(preprocess={"spacing": (2.5, 0.75, 0.75), "roi": (32, 64, 64)})
    text = ModelCard(model_card(config)).text
    assert "spacing (D, H, W) (2.5, 0.75, 0.75) mm" in text
    assert "ROI (D, H, W) (32, 64, 64)" in text and "HU window (-1150.0, 350.0)" in text
    assert "1 = lung, 2 = heart, 3 = esophagus, 4 = aorta" in text
    assert "heart = heart + atrial_appendage_left" in text
    assert "| lung | Emphysema |" in text


def test_evaluation_results_become_model_index():
    results = [
        EvalResult(task_type="zero-shot-image-classification", dataset_type=TRAINING_DATASET, dataset_name="CT-RATE",
                   dataset_split="validation", metric_type="roc_auc", metric_name="mean AUC", metric_value=0.781),
    ]
    card = ModelCard(model_card(tiny_config(), eval_results=results))
    assert "model-index" in card.content
    read = card.data.eval_results
    assert len(read) == 1 and read[0].metric_value == 0.781 and read[0].dataset_split == "validation"
    assert card.data.metrics == ["roc_auc"]
    assert "| CT-RATE | validation | mean AUC | 0.781 |" in card.text


def test_evaluation_of_visd_evaluate_goes_into_the_card(tmp_path):
    import numpy as np
    import pandas as pd

    from visd.evaluation import evaluate
    from visd.model_card import eval_results_from

    rng = np.random.default_rng(0)
    scans = [f"s{i}" for i in range(40)]
    labels = pd.DataFrame({"scan": scans})
    rows = []
    for organ, finding in (("lung", "Emphysema"), ("aorta", "Arterial wall calcification")):
        y = rng.integers(0, 2, len(scans))
        labels[finding] = y
        for scan, p in zip(scans, np.clip(0.3 * y + rng.uniform(0, 0.7, len(scans)), 0, 1)):
            rows.append({"scan": scan, "organ": organ, "finding": finding, "probability": p, "status": "scored"})
    result = evaluate(pd.DataFrame(rows), labels, n_bootstrap=0)
    results = eval_results_from(result, dataset_split="test")
    by_name = {r.metric_name: r.metric_value for r in results}
    assert by_name["mean AUC"] == round(float(result.table.loc["overall mean", "auc"]), 4)
    assert by_name["AUC Emphysema"] == round(float(result.table.loc["Emphysema", "auc"]), 4)
    assert {"mean F1 (weighted)", "mean accuracy", "AUC Arterial wall calcification"} <= by_name.keys()
    card = ModelCard(model_card(tiny_config(), eval_results=results))
    assert [r.metric_value for r in card.data.eval_results] == [r.metric_value for r in results]
    assert 0.5 < by_name["mean AUC"] <= 1.0  # the scores were made to carry the labels
