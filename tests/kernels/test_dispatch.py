"""Backend choice, argument validation and import hygiene of visd.kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import visd.kernels
from visd.errors import InputError, MissingDependencyError
from visd.kernels import _dispatch, nearest_code, segment_softmax_pool
from visd.kernels.reference import nearest_code_reference, segment_softmax_pool_reference

from ._helpers import codebook_inputs, pool_inputs


def test_public_names():
    assert sorted(visd.kernels.__all__) == ["NearestCodeOutput", "SegmentPoolOutput", "nearest_code", "segment_softmax_pool"]


@pytest.mark.parametrize("call", ["pool", "code"])
def test_unknown_backend_suggests_the_closest(call):
    with pytest.raises(InputError, match=r"unknown kernel backend: 'trition'.*Did you mean 'triton'\?"):
        if call == "pool":
            segment_softmax_pool(*pool_inputs([2], 3, 0, 1, torch.float32), 1.0, backend="trition")
        else:
            nearest_code(torch.zeros(1, 2), torch.zeros(1, 2), backend="trition")


def _pool_args(**changes):
    x_a, x_b, offsets, u_a, u_b = pool_inputs([2, 3], 4, 3, 2, torch.float32)
    args = dict(x_a=x_a, x_b=x_b, offsets=offsets, u_a=u_a, u_b=u_b, scale=0.5)
    args.update(changes)
    return args


BAD_POOL_ARGS = {
    "offsets-start": (dict(offsets=torch.tensor([1, 2, 5])), r"offsets must start at 0, got offsets\[0\] = 1"),
    "offsets-decrease": (dict(offsets=torch.tensor([0, 4, 3, 5]), u_a=torch.zeros(3, 2, 4),
                              u_b=torch.zeros(3, 2, 3)), r"non-decreasing, got offsets\[1\] = 4 > offsets\[2\] = 3"),
    "offsets-end": (dict(offsets=torch.tensor([0, 2, 4])), r"offsets must end at the number of rows N = 5, got .* 4"),
    "offsets-float": (dict(offsets=torch.tensor([0.0, 2.0, 5.0])), r"int32/int64 tensor"),
    "offsets-2d": (dict(offsets=torch.tensor([[0, 2, 5]])), r"offsets must have shape \(S \+ 1,\)"),
    "u_a-segments": (dict(u_a=torch.zeros(3, 2, 4)), r"u_a has shape \(3, 2, 4\); expected \(S, H, Fa\) = \(2, H >= 1, 4\)"),
    "u_a-features": (dict(u_a=torch.zeros(2, 2, 5)), r"u_a has shape \(2, 2, 5\)"),
    "u_b-heads": (dict(u_b=torch.zeros(2, 3, 3)), r"u_b has shape \(2, 3, 3\); expected \(S, H, Fb\) = \(2, 2, 3\)"),
    "u_b-missing": (dict(u_b=None), r"x_b and u_b must be given together"),
    "x_b-rows": (dict(x_b=torch.zeros(4, 3)), r"x_a and x_b differ in number of rows: 5 and 4"),
    "dtype-mismatch": (dict(u_a=torch.zeros(2, 2, 4, dtype=torch.float64)), r"u_a and x_a differ in dtype"),
    "integer-x": (dict(x_a=torch.zeros(5, 4, dtype=torch.int64)), r"x_a has dtype torch.int64"),
    "x_a-not-tensor": (dict(x_a=[[0.0]]), r"x_a must be a torch.Tensor"),
    "scale-nan": (dict(scale=float("nan")), r"scale must be a finite real number, got nan"),
    "scale-bool": (dict(scale=True), r"scale must be a finite real number, got True"),
}


@pytest.mark.parametrize("case", list(BAD_POOL_ARGS))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_pool_rejects_bad_arguments(case, backend):
    changes, message = BAD_POOL_ARGS[case]
    with pytest.raises(InputError, match=message):
        segment_softmax_pool(**_pool_args(**changes), backend=backend)


@pytest.mark.parametrize(
    ("z", "codebook", "message"),
    [
        (torch.zeros(3, 4), torch.zeros(5, 3), r"differ in feature size: z \(3, 4\), codebook \(5, 3\)"),
        (torch.zeros(3, 4), torch.zeros(0, 4), r"codebook is empty"),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(5, 4), r"z has dtype torch.int32"),
        (torch.zeros(4), torch.zeros(5, 4), r"z must have shape \(N, D\), got shape \(4,\)"),
    ],
)
def test_nearest_code_rejects_bad_arguments(z, codebook, message):
    with pytest.raises(InputError, match=message):
        nearest_code(z, codebook)


def test_int32_offsets_are_accepted():
    x_a, x_b, offsets, u_a, u_b = pool_inputs([2, 0, 3], 4, 3, 2, torch.float32)
    out = segment_softmax_pool(x_a, x_b, offsets.int(), u_a, u_b, 0.5, backend="reference")
    expected = segment_softmax_pool_reference(x_a, x_b, offsets, u_a, u_b, 0.5)
    assert torch.equal(out.pooled_a, expected.pooled_a)


def test_auto_on_cpu_runs_the_reference_without_loading_triton(monkeypatch):
    def fail(name):
        raise AssertionError(f"auto on CPU tensors must not load {name}")

    monkeypatch.setattr(visd.kernels, "load_triton_module", fail)
    monkeypatch.setattr(_dispatch, "load_triton_module", fail)
    inputs = pool_inputs([3, 0, 4], 5, 2, 2, torch.float32)
    out = segment_softmax_pool(*inputs, 0.5)
    expected = segment_softmax_pool_reference(*inputs, 0.5)
    assert torch.equal(out.pooled_a, expected.pooled_a) and torch.equal(out.pooled_b, expected.pooled_b)
    z, codebook = codebook_inputs(10, 4, 3, torch.float32)
    assert torch.equal(nearest_code(z, codebook).indices, nearest_code_reference(z, codebook).indices)


def test_backend_rules(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_dispatch, "_triton_installed", lambda: True)
    assert _dispatch.use_triton("auto", cuda, "triton_pool", None) is True
    assert _dispatch.use_triton("auto", cuda, "triton_pool", "float64") is False  # falls back
    assert _dispatch.use_triton("auto", cpu, "triton_pool", None) is False
    assert _dispatch.use_triton("reference", cuda, "triton_pool", None) is False
    with pytest.raises(InputError, match="backend='triton' cannot run these arguments: float64"):
        _dispatch.use_triton("triton", cuda, "triton_pool", "float64")
    with pytest.raises(InputError, match="got device 'meta'"):
        _dispatch.use_triton("triton", torch.device("meta"), "triton_pool", None)
    monkeypatch.setattr(_dispatch, "_triton_installed", lambda: False)
    assert _dispatch.use_triton("auto", cuda, "triton_pool", None) is False
    with pytest.raises(MissingDependencyError, match="needs the 'triton' package"):
        _dispatch.use_triton("triton", cpu, "triton_pool", None)


def test_forced_triton_rejects_what_the_kernel_cannot_run():
    with pytest.raises(InputError, match=r"float64"):
        segment_softmax_pool(*pool_inputs([2], 3, 0, 1, torch.float64), 1.0, backend="triton")
    with pytest.raises(InputError, match=r"more than the kernel's 16384"):
        segment_softmax_pool(*pool_inputs([2], 1000, 100, 16, torch.float32), 1.0, backend="triton")
    with pytest.raises(InputError, match=r"float64"):
        nearest_code(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, 3), backend="triton")


_SUBPROCESS = textwrap.dedent(
    """
    import sys
    import torch
    import visd.kernels as k
    from visd.errors import InputError, MissingDependencyError
    assert "triton" not in sys.modules, "importing visd.kernels imported triton"

    x = torch.randn(4, 3); u = torch.randn(1, 2, 3); offsets = torch.tensor([0, 4])

    sys.modules["triton"] = None  # as if triton were not installed
    k.segment_softmax_pool(x, None, offsets, u, None, 1.0)  # auto: the reference
    k.nearest_code(x, u[0])
    try:
        k.segment_softmax_pool(x, None, offsets, u, None, 1.0, backend="triton")
        raise SystemExit("no MissingDependencyError")
    except MissingDependencyError as e:
        print("missing:", e)
    del sys.modules["triton"]

    for call in (lambda: k.segment_softmax_pool(x, None, offsets, u, None, 1.0, backend="triton"),
                 lambda: k.nearest_code(x, u[0], backend="triton")):
        try:
            call()
            raise SystemExit("no InputError")
        except InputError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("cpu:", e)
    """
)


def test_import_is_cheap_and_cpu_triton_needs_the_interpreter(needs_triton):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "missing: backend='triton'" in result.stdout
    assert result.stdout.count("cpu: backend='triton' got CPU tensors") == 2
