"""``visd demo``: the whole path on a real CT scan shipped with the package, in well under a minute.

The scan is an upper-abdomen CT with its TotalSegmentator labels (``visd/demo_data/``, see its
README). :func:`run_demo` reads it, preprocesses it with the model's own spec, scores every finding,
writes the table (CSV and JSON) and the anomaly map (NIfTI and PNG) into a folder, and returns what it
did. The model is the official one (:data:`visd.pretrained.DEFAULT_MODEL`) when it is in the cache
(downloaded and converted before, see ``docs/getting_a_model.md``); otherwise a small model with
generated weights (seeded, so every run gives the same numbers), whose probabilities mean nothing:
the demo then shows that the path runs, not what the model finds. Nothing is downloaded.

::

    from visd.demo import run_demo
    result = run_demo("visd-demo")
    print(result.report.format_table())
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SCAN", "DemoResult", "add_demo_parser", "demo_files", "generated_model", "run_demo"]

logger = logging.getLogger(__name__)

DEMO_SCAN = "abdomen_3mm"
_SEED = 0

GENERATED_NOTICE = (
    "The official model ({name}) is not in the cache, so this demo uses a small model with GENERATED "
    "weights (random numbers, seed {seed}). ITS PROBABILITIES MEAN NOTHING: they only show that the "
    "path runs. To run the official model, see docs/getting_a_model.md (it is downloaded and converted "
    "on first use of ViSDModel.from_pretrained({name!r})); `visd demo` then uses it."
)


@dataclass
class DemoResult:
    """What :func:`run_demo` did.

    Attributes:
        report: the :class:`~visd.zero_shot.DiagnosisReport` of the demo scan.
        model: where the model came from: the cached official model's folder, or ``"generated weights"``.
        generated_weights: ``True`` when the model has generated weights (its probabilities mean nothing).
        files: the files written: ``"csv"``, ``"json"``, ``"anomaly_nifti"``, ``"anomaly_png"``.
        notice: the plain warning about generated weights (empty with the official model).
    """

    report: Any
    model: str
    generated_weights: bool
    files: dict[str, Path] = field(default_factory=dict)
    notice: str = ""


def demo_files() -> tuple[Path, Path]:
    """The shipped demo scan and its TotalSegmentator label map (``.nii.gz`` files in the package)."""
    folder = Path(str(resources.files("visd") / "demo_data"))
    return folder / f"{DEMO_SCAN}.nii.gz", folder / f"{DEMO_SCAN}_totalseg.nii.gz"


def generated_model():
    """A small :class:`~visd.ViSDModel` with seeded generated weights and the shipped tiny vocabulary.

    Narrow backbone and text tower, the official preprocessing, organs and findings. The global
    random state is left as it was. Its outputs are deterministic and meaningless.
    """
    import torch

    from visd.config import NormalityConfig, TextConfig, ViSDConfig, VisionConfig
    from visd.models.model import ViSDModel
    from visd.models.text import load_tokenizer

    config = ViSDConfig(
        embed_dim=32,
        attention_heads=2,
        vision=VisionConfig(layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), token_dim=32),
        normality=NormalityConfig(hidden_dim=32, dim=48, depth=1, heads=2, head_dim=16, mlp_dim=64, codebook_size=16),
        text=TextConfig(
            vocab_size=417, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, max_length=32,
        ),
    )
    tokenizer = load_tokenizer(Path(str(resources.files("visd") / "demo_data" / "tiny_text")), config.text)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = ViSDModel(config, tokenizer=tokenizer)
    return model.eval()


def _load_model() -> tuple[Any, str, bool]:
    """The cached official model, or the generated one: ``(model, where from, generated)``. No network."""
    from visd.pretrained import DEFAULT_MODEL, cached_folder

    folder = cached_folder(DEFAULT_MODEL)
    if folder is not None:
        from visd.models.model import ViSDModel

        logger.info("demo: the official model %s from the cache %s", DEFAULT_MODEL, folder)
        return ViSDModel.from_pretrained(folder), str(folder), False
    logger.info("demo: %s is not in the cache; a model with generated weights", DEFAULT_MODEL)
    return generated_model(), "generated weights", True


def run_demo(out_dir: str | os.PathLike = "visd-demo", *, progress: bool = True) -> DemoResult:
    """Diagnose the shipped scan and write ``results.csv``, ``results.json`` and its anomaly map to ``out_dir``.

    Args:
        out_dir: output folder (created when missing): ``results.csv``, ``results.json``,
            ``abdomen_3mm_anomaly.nii.gz`` (on the scan's grid) and ``abdomen_3mm_anomaly.png``.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`DemoResult`; ``generated_weights`` says whether the probabilities mean nothing.
    """
    from visd.pretrained import DEFAULT_MODEL
    from visd.zero_shot import diagnose

    out = Path(out_dir)
    ct, labels = demo_files()
    model, source, generated = _load_model()
    report = diagnose([ct], [labels], model, anomaly_maps_dir=out, progress=progress, scan_ids=[DEMO_SCAN])
    files = {"csv": report.to_csv(out / "results.csv"), "json": report.to_json(out / "results.json")}
    if DEMO_SCAN in report.anomaly_maps:
        files["anomaly_nifti"], files["anomaly_png"] = report.anomaly_maps[DEMO_SCAN]
    notice = GENERATED_NOTICE.format(name=DEFAULT_MODEL, seed=_SEED) if generated else ""
    return DemoResult(report=report, model=source, generated_weights=generated, files=files, notice=notice)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``demo`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole path on a CT scan shipped with visd: table, anomaly map (no download)",
        description="Diagnose the upper-abdomen CT shipped with visd (with its TotalSegmentator labels): read, "
        "preprocess, score every finding, print the table, write it with the anomaly map. Uses the official "
        "model when it is in the cache, else a model with generated weights whose probabilities mean nothing.",
    )
    p.add_argument("--out", default="visd-demo", metavar="DIR",
                   help="folder for results.csv, results.json and the anomaly map (default: ./visd-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_demo_command)
    return p


def _run_demo_command(args: argparse.Namespace) -> int:
    result = run_demo(args.out, progress=not args.no_progress)
    if result.generated_weights:
        print(f"NOTE: {result.notice}\n")
    else:
        print(f"model: the official model from {result.model}\n")
    print(result.report.format_table())
    print()
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 1 if result.report.failed else 0
