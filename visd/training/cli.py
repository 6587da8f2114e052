"""``visd train --config CONFIG.yaml [--resume]``: the training sub-command.

Works as a plain command (one process) and under ``torchrun``::

    torchrun --nproc_per_node 4 -m visd.cli train --config pretrain.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

__all__ = ["add_train_parser"]

logger = logging.getLogger(__name__)


def _train(args: argparse.Namespace) -> int:
    from visd.training.config import TrainConfig
    from visd.training.engine import SUMMARY_FILE, train
    from visd.training.summary import format_summary

    config = TrainConfig.from_file(args.config)
    folder = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        summary = json.loads((Path(config.output_dir) / SUMMARY_FILE).read_text())
        print(format_summary(summary))
        print(f"trained model written to {folder}")
    return 0


def add_train_parser(subparsers) -> None:
    """Register ``train`` on the ``visd`` command's sub-parsers."""
    p = subparsers.add_parser(
        "train",
        help="pre-train or fine-tune a model on CT-report pairs (one process or torchrun)",
        description="Run the stages of a training config (YAML; see docs/training.md). Checkpoints, logs and the "
        "exported model go to the config's output_dir. Launch with torchrun for several processes/GPUs.",
    )
    p.add_argument("--config", required=True, metavar="YAML", help="training config (TrainConfig) file")
    p.add_argument(
        "--resume", action="store_true",
        help="continue from the newest checkpoint in output_dir/checkpoints (a new run starts if there is none)",
    )
    p.set_defaults(func=_train)
