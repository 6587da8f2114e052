"""``visd train``: registration, one-line errors, and the complete small run of docs/training.md."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import yaml
from tests.conftest import DATA, OFFICIAL

from visd.cli import build_parser, main
from visd.training.logs import read_metrics

from ._train_helpers import REPO, one_thread  # noqa: F401

DOC = REPO / "docs" / "training.md"


def test_train_is_registered():
    args = build_parser().parse_args(["train", "--config", "x.yaml", "--resume"])
    assert args.config == "x.yaml" and args.resume is True and callable(args.func)
    assert build_parser().parse_args(["train", "--config", "x.yaml"]).resume is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train"])  # --config is required


def test_bad_config_is_one_line_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(
        "model: {pretrained: m}\ndata: {manifest: m.csv}\nstages: [{objectives: [normality]}]\noutput_dir: o\nsed: 1\n"
    )
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visd train: error:") and "Did you mean 'seed'?" in err and len(err.splitlines()) == 1


def _doc_block(language: str, after: str) -> str:
    text = DOC.read_text()
    start = text.index(after)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert match, f"no {language} block after {after!r} in {DOC}"
    return match.group(1)


def _documented_run(folder, **changes):
    """The files of docs/training.md's small run in ``folder`` (the scans cut by its python block);
    ``changes`` update the top level of tiny.yaml, ``model_config`` the model config."""
    code = _doc_block("python", "## A complete small run").replace("tests/data/", f"{DATA}/")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "docs/training.md", "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)
    (folder / "manifest.csv").write_text(_doc_block("csv", "## A complete small run"))
    config = yaml.safe_load(_doc_block("yaml", "and the config as `tiny.yaml`"))
    config["model"]["tokenizer"] = str(OFFICIAL / "tiny_text")
    config["model"]["config"].update(changes.pop("model_config", {}))
    config.update(changes)
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    return folder / "tiny.yaml"


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.usefixtures("one_thread")
def test_the_documented_small_run_trains(tmp_path, capsys):
    """Real scans -> visd's data loading -> model: every objective uses organs every step, and learns."""
    from visd import ViSDModel

    command = _doc_block("bash", "Then:")
    assert "visd train --config tiny.yaml" in command
    assert main(["train", "--config", str(_documented_run(tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert "trained model written to" in printed
    rows = read_metrics(tmp_path / "runs" / "tiny" / "metrics.csv")
    assert [(int(r["step"]), r["stage"]) for r in rows] == (
        [(i, "alignment+disease") for i in range(1, 21)] + [(i, "normality") for i in range(21, 27)]
    )
    contrastive, normality = rows[:20], rows[20:]
    # every organ of both scans counts in every step (8 pairs); normality: the 4 normal ones
    for r in contrastive:
        assert (r["alignment_organs"], r["disease_organs"]) == ("8.0", "8.0"), r
    assert all(r["normality_organs"] == "4.0" and r["normality_abnormal"] == "4.0" for r in normality)
    for name, part, n, fraction in (("alignment", contrastive, 8, 0.8), ("disease", contrastive, 8, 0.8),
                                    ("normality", normality, 2, 0.7)):
        losses = [float(r[name]) for r in part]
        assert all(math.isfinite(v) and v > 0 for v in losses), (name, losses)
        # learns: the mean of the last n steps is below `fraction` of the mean of the first n
        assert _mean(losses[-n:]) < fraction * _mean(losses[:n]), (name, losses)
    # the per-stage summary, printed and written
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert [(s["stage"], s["steps"]) for s in summary] == [("alignment+disease", 20), ("normality", 6)]
    assert summary[0]["organs"] == {"alignment": 160, "disease": 160} and summary[1]["organs"] == {"normality": 24}
    mean = _mean([float(r["alignment"]) for r in contrastive])
    assert summary[0]["loss"]["alignment"] == pytest.approx(mean, rel=1e-6)
    assert f"mean loss {mean:.4f}  organs used 160 of 160" in printed and "stage normality: 6 steps" in printed
    model = ViSDModel.from_pretrained(tmp_path / "runs" / "tiny" / "model")
    assert model.organs == ("liver", "spleen", "kidney", "aorta") and model.config.embed_dim == 32
    assert torch.isfinite(model.encode_text(["Splenomegaly."])).all()
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())[-1] == "step-000000026.pt"


@pytest.mark.usefixtures("one_thread")
def test_a_crop_that_excludes_every_organ_stops_with_the_reason(tmp_path, capsys, caplog):
    """The documented run with a 16 x 64 x 64 ROI: the 15-slice scans fill the 16 planes, so every organ
    touches the crop border (or lies outside the crop) and nothing trains."""
    small = {"preprocess": {"spacing": [3.0, 2.0, 2.0], "roi": [16, 64, 64]}}
    config = _documented_run(tmp_path, model_config=small, organ_check_steps=3, checkpoint_every=1)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("visd train: error: stage 'alignment+disease'")
    assert "the alignment and disease objectives used no organ in 3 steps" in err
    assert "alignment used 0 of 24 (scan, organ) pairs; not used: " in err and "touches_window_border" in err
    assert "enlarge preprocess.roi" in err and "(16, 64, 64)" in err and "here (16, 134, 179), (16, 135, 177))" in err
    run = tmp_path / "runs" / "tiny"
    assert len(read_metrics(run / "metrics.csv")) == 3  # it stopped after the third step
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("the alignment objective used 0 of 8 (scan, organ) pairs; not used:" in m for m in warned) == 3, warned
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())  # nothing blocks a new run
    assert not (run / "model").exists()
    # the fixed config starts afresh in the same output_dir, without --resume
    fixed = _documented_run(tmp_path, stages=[{"objectives": ["normality"], "max_steps": 1, "batch_size": 2}])
    assert main(["train", "--config", str(fixed)]) == 0
    assert [r["stage"] for r in read_metrics(run / "metrics.csv")] == ["normality"]
