"""The ``visd`` command line: parse arguments, call the public API, print results or one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from visd._version import __version__
from visd.errors import VisdError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("visd")


def _convert(args: argparse.Namespace) -> int:
    from visd.models.model import ViSDModel

    model = ViSDModel.from_official(args.checkpoint, args.text_encoder)
    out = model.save_pretrained(args.out)
    print(f"wrote {out} ({sum(p.numel() for p in model.state_dict().values()):,} values)")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert the official ViSD-Boost release into a visd model folder",
        description="Convert the official .pth checkpoints (applied in order, later overriding earlier) "
        "and the CXR-BERT text-encoder folder into a folder for ViSDModel.from_pretrained.",
    )
    p.add_argument("--checkpoint", action="append", required=True, metavar="PTH",
                   help="official checkpoint; repeat, e.g. --checkpoint checkpoint_vqvae.pth --checkpoint checkpoint.pth")
    p.add_argument("--text-encoder", required=True, metavar="DIR", help="BiomedVLP-CXR-BERT-specialized folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    p.set_defaults(func=_convert)


def _optional_commands() -> list[Callable]:
    """Sub-command registrars of the optional subpackages, skipped where a subpackage is absent."""
    registrars = []
    for module, names in (
        ("visd.zero_shot.cli", ("add_diagnose_parser",)),
        ("visd.data.cli", ("add_segment_parser",)),
        ("visd.demo", ("add_demo_parser",)),
        ("visd.evaluation.cli", ("add_evaluate_parser", "add_probe_parser")),
        ("visd.training.cli", ("add_train_parser",)),
        ("visd.retrieval.cli", ("add_index_parser", "add_search_parser")),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue
            raise
        registrars += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visd", description="ViSD-Boost CT vision-language model")
    parser.add_argument("--version", action="version", version=f"visd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    for register in _optional_commands():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:  # huggingface_hub logs every retry of an unreachable Hub, twice (its handler and ours);
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # visd's own error says what failed (read on its import)
    try:
        return int(args.func(args) or 0)
    except VisdError as e:
        print(f"visd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"visd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
