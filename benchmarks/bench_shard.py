"""Scans per second of ``visd diagnose`` under torchrun with 1 and 2 ranks (gloo on the CPU, one GPU a rank).

The manifest holds ``--scans`` copies of the real abdomen CT of ``tests/data`` (with its TotalSegmentator
mask). The model is the tests' tiny model (``tests/conftest.py``) unless ``--model`` names a model folder,
so on a CPU the figures measure the sharding (process start, model load per rank, the merge) as much
as the network. Each rank runs with ``OMP_NUM_THREADS=--threads``; the wall time includes torchrun's
start and every rank's model load, as a user sees it::

    python benchmarks/bench_shard.py --scans 8 --ranks 1 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import record  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=8)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    ap.add_argument("--model", default=None, help="model folder (default: the tests' tiny model)")
    ap.add_argument("--record", action="store_true", help="append the rows to benchmarks/README.md")
    ap.add_argument("--conditions", default="", help="what else ran on the machine, for the row (e.g. 'under load from other jobs')")
    args = ap.parse_args()
    data = REPO / "tests" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import make_tiny_model

            model = str(make_tiny_model().save_pretrained(tmp / "visd-tiny"))
        rows = []
        for i in range(args.scans):
            shutil.copy(data / "abdomen_3mm.nii.gz", tmp / f"scan{i}.nii.gz")
            rows.append(f"scan{i}.nii.gz,{data / 'abdomen_3mm_totalseg.nii.gz'}\n")
        (tmp / "cases.csv").write_text("image,mask\n" + "".join(rows))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        for ranks in args.ranks:
            out = tmp / f"out{ranks}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(_port()), "-m", "visd.cli", "diagnose", "--manifest",
                   str(tmp / "cases.csv"), "--model", model, "--out", str(out / "results.csv"), "--no-progress"]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            note = (f"{args.scans / seconds:.3f} scans/s, {args.scans} abdomen CTs, "
                    f"{'tiny model' if args.model is None else args.model}, OMP_NUM_THREADS={args.threads} per rank, "
                    "wall time incl. torchrun start and model load per rank" + (f"; {args.conditions}" if args.conditions else ""))
            print(f"{ranks} rank(s): {seconds:.2f} s, {note}")
            if args.record:
                record(f"diagnose {args.scans} scans, torchrun", f"{ranks} rank(s), gloo", seconds, float("nan"),
                       note, "python benchmarks/bench_shard.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
