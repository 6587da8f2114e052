"""``visd train``: registration, one-line errors, and the complete small run of docs/training.md."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import DATA, OFFICIAL

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


@pytest.mark.usefixtures("one_thread")
def test_the_documented_small_run_trains(tmp_path, capsys):
    from visd import ViSDModel

    manifest = _doc_block("csv", "## A complete small run")
    config = _doc_block("yaml", "and the config as `tiny.yaml`")
    command = _doc_block("bash", "Then:")
    assert "visd train --config tiny.yaml" in command
    (tmp_path / "manifest.csv").write_text(manifest.replace("tests/data/", f"{DATA}/"))
    (tmp_path / "tiny.yaml").write_text(config.replace("tests/data/official/tiny_text", str(OFFICIAL / "tiny_text")))
    assert main(["train", "--config", str(tmp_path / "tiny.yaml")]) == 0
    assert "trained model written to" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "runs" / "tiny" / "metrics.csv")
    assert [(r["step"], r["stage"]) for r in rows] == [("1", "alignment+disease"), ("2", "alignment+disease"), ("3", "normality")]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    model = ViSDModel.from_pretrained(tmp_path / "runs" / "tiny" / "model")
    assert model.organs == ("lung", "heart", "esophagus", "aorta") and model.config.embed_dim == 32
    ids, _ = model.tokenize(["Emphysema."])
    assert ids.shape[0] == 1 and torch.isfinite(model.encode_text(["Emphysema."])).all()
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir())[-1] == "step-000000003.pt"
