"""The main job in one command: ``visd diagnose scan.nii.gz --segment --out results.csv``.

The default model is the named official one; the findings are printed as well as written; a
TotalSegmentator that cannot run fails each scan with one line and leaves nothing that blocks the next run.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd

from tests.conftest import make_tiny_model, save_in_cache
from tests.printed_table import assert_table_is_the_csv, parse_table

from .conftest import CT, SEG

_NO_TOTALSEGMENTATOR = (  # the visd command as where TotalSegmentator is not installed (its import fails)
    "import sys; sys.modules['totalsegmentator'] = None; from visd.cli import main; sys.exit(main())"
)


def _visd(*args, code=None):
    head = ["-c", code] if code else ["-m", "visd.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], capture_output=True, text=True)


def test_without_model_the_named_default_is_used_and_the_table_is_printed(tmp_path, reference, monkeypatch):
    from visd.pretrained import DEFAULT_MODEL

    assert DEFAULT_MODEL == "visd-boost-ctrate"
    monkeypatch.setenv("VISD_HOME", str(tmp_path / "home"))  # for this process and the visd subprocess
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_in_cache(make_tiny_model(seed=0), DEFAULT_MODEL)  # the model of `reference`, as if fetched before
    out = tmp_path / "results.csv"
    proc = _visd("diagnose", CT, "--mask", SEG, "--out", out, "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    csv = pd.read_csv(out)
    scored = csv[csv.status == "scored"]
    want = {(s.organ, s.finding): s.probability for s in reference.scores if s.status == "scored"}
    assert len(scored) == len(want) > 0
    np.testing.assert_allclose(scored.probability, [want[(o, f)] for o, f in zip(scored.organ, scored.finding)],
                               atol=1e-5)  # the cached model's results: the default name resolved to it
    assert_table_is_the_csv(parse_table(proc.stdout), csv)
    assert set(parse_table(proc.stdout).status) == {"scored", "organ_absent"}


def test_help_names_the_default_model():
    from visd.pretrained import DEFAULT_MODEL

    proc = _visd("diagnose", "--help")
    assert proc.returncode == 0 and f"(default: {DEFAULT_MODEL}," in " ".join(proc.stdout.split())


def test_segment_without_totalsegmentator_fails_each_scan_in_one_line(tmp_path, model_dir):
    """TotalSegmentator not installed: one line per scan, exit 1, no traceback, no journal; the next run starts."""
    scans = [CT, tmp_path / "second.nii.gz"]
    scans[1].write_bytes(CT.read_bytes())
    out = tmp_path / "results.csv"
    args = ["diagnose", *scans, "--segment", "--model", model_dir, "--out", out, "--no-progress"]
    for attempt in range(2):  # the second run without --resume starts: the first left nothing in its way
        proc = _visd(*args, code=_NO_TOTALSEGMENTATOR)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().split("\n")
        assert len(lines) == 2, proc.stderr
        for line, scan in zip(lines, ("abdomen_3mm", "second")):
            assert f"skipped scan {scan!r}: organ segmentation needs TotalSegmentator" in line
            assert 'pip install "visd[segment]"' in line and "--mask" in line
        assert not (tmp_path / "results.csv.journal").exists()
        assert "diagnosed 2 scan(s): 0 ok, 2 failed" in proc.stdout
        csv = pd.read_csv(out)
        assert csv.probability.isna().all() and csv.status.str.contains("needs TotalSegmentator").all()
        assert_table_is_the_csv(parse_table(proc.stdout), csv)


def test_a_header_only_journal_does_not_block_a_new_run(tmp_path, model_dir):
    """A journal without a diagnosed scan (left by an older visd) holds nothing to resume."""
    import json

    from visd.zero_shot.journal import JOURNAL_FORMAT, holds_scans

    journal = tmp_path / "r.csv.journal"
    journal.write_text(json.dumps({"format": JOURNAL_FORMAT, "fingerprint": "x", "embeddings_shape": [4, 32]}) + "\n")
    assert not holds_scans(journal)
    journal.write_text(journal.read_text() + '{"scan": "a"}\n')
    assert holds_scans(journal)
    (tmp_path / "other.journal").write_text("scan,organ\n")
    assert holds_scans(tmp_path / "other.journal")  # not a journal: never replaced silently
    assert not holds_scans(tmp_path / "missing.journal")


def test_segment_with_weights_out_of_reach_fails_each_scan_in_one_line(tmp_path, model, reference):
    """A TotalSegmentator whose weight download fails (a real refused connection): each scan without a
    mask is skipped with one line naming the failure; a scan with its mask is diagnosed."""
    import socket

    from visd.zero_shot import diagnose

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    package = tmp_path / "site" / "totalsegmentator"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("def setup_totalseg():\n    pass\n\n\ndef set_config_key(key, value):\n    pass\n")
    (package / "python_api.py").write_text(  # the first step of a first run: fetch the weights
        "import urllib.request\n\n\ndef totalsegmentator(input, output, **kwargs):\n"
        f"    urllib.request.urlopen('http://127.0.0.1:{port}/Dataset291_TotalSegmentator.zip', timeout=5)\n"
    )
    sys.path.insert(0, str(package.parent))
    try:
        report = diagnose([CT, CT], [None, SEG], model, segment_dir=tmp_path / "seg", progress=False,
                          scan_ids=["no_mask", "with_mask"])
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m.split(".")[0] == "totalsegmentator"]:
            del sys.modules[name]
    ((scan, reason),) = report.failed
    assert scan == "no_mask" and "\n" not in reason
    assert reason.startswith("TotalSegmentator could not segment scan 'no_mask' (URLError:") and "--mask" in reason
    done = report.to_pandas()
    done = done[done.scan == "with_mask"]
    assert list(done.status) == [s.status for s in reference.scores]
