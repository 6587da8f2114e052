"""Evaluation: the official metrics, bootstrap intervals, paired comparisons, reports and linear probes.

Typical use::

    from visd.evaluation import evaluate, write_report
    result = evaluate("results.csv", "labels.csv", n_bootstrap=1000, seed=0)
    write_report(result, "report/")

See ``docs/evaluation.md`` for the definitions (threshold rule, missing scores, bootstrap design).
"""

from .bootstrap import bootstrap_finding
from .embeddings_io import Embeddings, load_embeddings, save_embeddings
from .metrics import METRICS, THRESHOLDS, finding_metrics, official_threshold
from .pipeline import Comparison, Evaluation, compare, evaluate
from .probe import linear_probe
from .report import write_report
from .retrieval import RetrievalResult, retrieval_metrics
from .tables import read_labels, read_predictions

__all__ = [
    "METRICS",
    "THRESHOLDS",
    "Comparison",
    "Embeddings",
    "Evaluation",
    "RetrievalResult",
    "bootstrap_finding",
    "compare",
    "evaluate",
    "finding_metrics",
    "linear_probe",
    "load_embeddings",
    "official_threshold",
    "read_labels",
    "read_predictions",
    "retrieval_metrics",
    "save_embeddings",
    "write_report",
]
