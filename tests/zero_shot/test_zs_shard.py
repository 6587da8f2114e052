"""Sharded ``visd diagnose`` under torchrun (gloo): the same table as one process; a killed rank resumes.

The 12-scan manifest is the bad-case batch of test_zs_cli (bad scans of every kind) with three good
scans in place of three bad ones, so that both ranks have good scans to journal.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.printed_table import assert_table_is_the_csv, parse_table
from visd.evaluation import load_embeddings
from visd.zero_shot.shard import _size, rank_journals, shares

from .conftest import CT, CT_LPS, SEG, SEG_LPS
from .test_zs_cli import _write_cases

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _diagnose(manifest, model_dir, out, *, ranks: int | None, resume=False, fault=None):
    """``visd diagnose`` as one plain process (ranks=None) or under torchrun with ``ranks`` processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("VISD_DIAGNOSE_FAULT", None)
    if fault:
        env["VISD_DIAGNOSE_FAULT"] = fault
    launcher = [sys.executable]
    if ranks is not None:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                     "--master_port", str(_free_port())]
    args = ["-m", "visd.cli", "diagnose", "--manifest", str(manifest), "--model", str(model_dir), "--out",
            str(out / "results.csv"), "--embeddings", str(out / "emb.safetensors"), "--json", str(out / "results.json"),
            "--anomaly-maps", str(out / "maps"), "--no-progress"]
    return subprocess.run(launcher + args + (["--resume"] if resume else []), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard")
    rows = [r for r in _write_cases(folder) if "empty_mask" not in str(r[0]) and "gap_series" not in str(r[0])]
    shutil.copy(CT, folder / "cases" / "abdomen_copy.nii.gz")
    rows[1:1] = [(CT_LPS, SEG_LPS)]
    rows.append(("cases/abdomen_copy.nii.gz", SEG))
    assert len(rows) == 12
    (folder / "cases.csv").write_text("image,mask\n" + "".join(f"{i},{m}\n" for i, m in rows))
    return folder / "cases.csv"


@pytest.fixture(scope="module")
def single(manifest, model_dir):
    out = manifest.parent / "single"
    proc = _diagnose(manifest, model_dir, out, ranks=None)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "diagnosed 12 scan(s): 3 ok, 9 failed" in proc.stdout
    return out


def _same_outputs(out, reference):
    got, want = pd.read_csv(out / "results.csv"), pd.read_csv(reference / "results.csv")
    assert len(want) == 12 * 16
    pd.testing.assert_frame_equal(got.drop(columns="probability"), want.drop(columns="probability"))
    np.testing.assert_allclose(got.probability, want.probability, rtol=1e-5, atol=1e-6)  # NaN where NaN
    e1, e2 = load_embeddings(out / "emb.safetensors"), load_embeddings(reference / "emb.safetensors")
    assert e1.scans == e2.scans and e1.organs == e2.organs
    np.testing.assert_allclose(e1.embeddings, e2.embeddings, rtol=1e-5, atol=1e-6)
    j1, j2 = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert j1["scans"] == j2["scans"] and j1["failed"] == j2["failed"] and len(j1["failed"]) == 9
    # a rank killed while writing a map may leave a hidden temporary file of atomic_path: not a map
    maps = sorted(p.name for p in (out / "maps").iterdir() if not p.name.startswith("."))
    assert maps == sorted(p.name for p in (reference / "maps").iterdir()) and len(maps) == 6
    assert not rank_journals(out / "results.csv") and not (out / "results.csv.journal").exists()
    assert sorted(p.name for p in out.iterdir()) == ["emb.safetensors", "maps", "results.csv", "results.json"]


def test_shares_are_balanced_by_size_and_cover_the_manifest():
    # longest first: 0 -> r0 (5), 3 -> r1 (3), 4 -> r1 (5), 5 -> r0 (tie, 7), 1 -> r1 (6), 2 -> r1 (7)
    assert shares([5, 1, 1, 3, 2, 2], 2) == [[0, 5], [1, 2, 3, 4]]
    assert shares([1, 1, 1], 5) == [[0], [1], [2], [], []]
    parts = shares(list(range(20, 0, -1)), 3)
    assert sorted(i for p in parts for i in p) == list(range(20))


def test_two_gloo_ranks_give_the_table_of_one_process(manifest, model_dir, single):
    out = manifest.parent / "two"
    proc = _diagnose(manifest, model_dir, out, ranks=2)
    # exit code 1 (scans were skipped), which torchrun reports with its own ChildFailedError traceback
    assert proc.returncode == 1 and proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert "ChildFailedError" in proc.stderr and "exitcode  : 1" in proc.stderr
    assert "diagnosed 12 scan(s) on 2 rank(s): 3 ok, 9 failed" in proc.stdout
    _same_outputs(out, single)
    assert_table_is_the_csv(parse_table(proc.stdout), pd.read_csv(out / "results.csv"))  # rank 0 prints the table


@pytest.mark.slow
@pytest.mark.parametrize("resume_ranks", [2, None], ids=["resume-2-ranks", "resume-1-process"])
def test_a_killed_rank_resumes_to_the_same_table(manifest, model_dir, single, resume_ranks):
    from visd.zero_shot.cli import read_manifest

    images, _, _ = read_manifest(manifest)
    (victim,) = [r for r, s in enumerate(shares([_size(i) for i in images], 2)) if images.index(str(CT_LPS)) in s]
    out = manifest.parent / f"crash_{resume_ranks}"
    crashed = _diagnose(manifest, model_dir, out, ranks=2, fault=f"{victim}:1")
    assert crashed.returncode != 0 and not (out / "results.csv").exists()
    journals = rank_journals(out / "results.csv")
    assert journals and "ct_lps" in (out / f"results.csv.journal.rank{victim}").read_text()
    proc = _diagnose(manifest, model_dir, out, ranks=resume_ranks, resume=True)
    ranks = resume_ranks or 1
    assert f"diagnosed 12 scan(s) on {ranks} rank(s): 3 ok" in proc.stdout, proc.stderr[-3000:]
    assert "taken from the journals" in proc.stdout
    _same_outputs(out, single)


def test_journals_of_a_sharded_run_are_never_overwritten(manifest, model_dir, tmp_path, capsys):
    from visd.cli import main

    out = tmp_path / "results.csv"
    (tmp_path / "results.csv.journal.rank1").write_text('{"format": "visd.diagnose-journal/1"}\n')
    argv = ["diagnose", "--manifest", str(manifest), "--model", str(model_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 2  # a plain run sees the journal of a sharded one
    assert "results.csv.journal.rank1 holds the scans of an interrupted run. Pass --resume" in capsys.readouterr().err
    assert (tmp_path / "results.csv.journal.rank1").is_file() and not out.exists()


def test_journals_of_two_setups_are_refused(tmp_path):
    from visd.errors import InputError
    from visd.zero_shot.shard import _journaled

    a, b = tmp_path / "r.journal.rank0", tmp_path / "r.journal.rank1"
    a.write_text('{"fingerprint": "a"}\n{"scan": "s1"}\n{"scan": "s2", "ro')  # a last line cut off
    assert _journaled([a]) == ('{"fingerprint": "a"}', {"s1": '{"scan": "s1"}'})
    b.write_text('{"fingerprint": "b"}\n')
    with pytest.raises(InputError, match="runs with different settings"):
        _journaled([a, b])
