"""orthofx.nn's modules under ``torch.jit.script`` (issue 23), against the same module in eager
mode.

The scripted forward calls the ``torch.ops.orthofx`` operators (orthofx/nn/_script.py), which
run eager mode's solvers and register eager mode's backward (the exact Daleckii–Krein gradient,
Newton–Schulz through autograd, the Gram route's closed form, the bounded-K eigh gradient). So
the scripted module must match eager mode in outputs, input and parameter gradients and
running statistics, in train and eval mode: float64 with atol = rtol = 1e-10, float32 with
atol = rtol = 1e-5 (measured: bitwise equal on the CPU).
"""

import copy
import io
import warnings

import pytest
import torch
from torch import Tensor, nn

import orthofx
from orthofx.nn import CovariancePooling, DecorrelatedBatchNorm  # registers the torch.ops.orthofx operators

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated for export
        return torch.jit.script(module)


def _close(got: Tensor, want: Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype], msg=what)


def _same_buffers(eager: nn.Module, scripted: nn.Module, dtype: torch.dtype) -> None:
    want, got = dict(eager.named_buffers()), dict(scripted.named_buffers())
    assert want.keys() == got.keys()
    for name, buf in want.items():
        _close(got[name], buf, dtype, name)


def _train_and_eval(eager: nn.Module, scripted: nn.Module, shape: tuple[int, ...], dtype: torch.dtype,
                    steps: int = 3) -> None:
    """``steps`` training forwards and backwards (outputs, input and parameter gradients,
    buffers compared after each), then an eval forward."""
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape, dtype=dtype, generator=gen)
        xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, ys = eager(xe), scripted(xs)
        _close(ys, ye, dtype, f"train output, step {step}")
        w = torch.randn(ye.shape, dtype=dtype, generator=gen)
        (ye * w).sum().backward()
        (ys * w).sum().backward()
        _close(xs.grad, xe.grad, dtype, f"input gradient, step {step}")
        for (name, pe), ps in zip(eager.named_parameters(), scripted.parameters()):
            _close(ps.grad, pe.grad, dtype, f"gradient of {name}, step {step}")
        _same_buffers(eager, scripted, dtype)
    eager.eval()
    scripted.eval()
    x = torch.randn(shape, dtype=dtype, generator=gen)
    _close(scripted(x), eager(x), dtype, "eval output")
    _close(scripted(x), eager(x), dtype, "eval output, second call (eager: cached W)")


DBN_CONFIGS = {
    "default": {},
    "running-whitening": {"running": "whitening"},
    "groups-cumulative": {"groups": 2, "momentum": None},
    "no-affine-no-stats": {"affine": False, "track_running_stats": False},
    "ns": {"backend": "ns", "iters": 4},
    "svd": {"backend": "svd"},
    "eps-1e-2-float64-compute": {"eps": 1e-2, "compute_dtype": torch.float64, "backend": "svd"},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DBN_CONFIGS))
def test_scripted_dbn_matches_eager(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    eager = DecorrelatedBatchNorm(6, **DBN_CONFIGS[name]).to(dtype)
    with torch.no_grad():
        if eager.affine:
            eager.weight.uniform_(0.5, 1.5)
            eager.bias.uniform_(-0.5, 0.5)
    scripted = _script(copy.deepcopy(eager))
    _train_and_eval(eager, scripted, (8, 6, 3, 3), dtype)


def test_scripted_dbn_on_2d_input_and_rank_deficient_batches() -> None:
    """(N, C) input with N = 4 < C = 6: Σ has rank ≤ 3 and the εI cluster holds repeated
    eigenvalues; the scripted gradient is the exact, finite Daleckii–Krein one of eager mode."""
    eager = DecorrelatedBatchNorm(6).double()
    scripted = _script(copy.deepcopy(eager))
    _train_and_eval(eager, scripted, (4, 6), torch.float64)


def test_scripted_dbn_gradcheck() -> None:
    """The scripted backward is the derivative of the scripted forward (float64, finite differences)."""
    scripted = _script(DecorrelatedBatchNorm(4, eps=1e-2).double())
    x = torch.randn(6, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scripted, (x,))


GCP_CONFIGS = {
    "default-eigh": ({}, (4, 8, 3, 3)),             # M = 9 >= C = 8: the spectral route
    "auto-gram": ({}, (4, 8, 2, 2)),                # M = 4 < C: the Gram route
    "reduced": ({"reduced": 4}, (4, 8, 3, 3)),
    "gram": ({"backend": "gram", "output": "full"}, (3, 8, 3, 3)),
    "ns-full": ({"backend": "ns", "output": "full"}, (3, 8, 3, 3)),
    "svd-reduced": ({"backend": "svd", "reduced": 3}, (3, 8, 3, 3)),
    "eps-0": ({"eps": 0.0, "backend": "eigh"}, (3, 8, 3, 3)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GCP_CONFIGS))
def test_scripted_covariance_pooling_matches_eager(name: str, dtype: torch.dtype) -> None:
    kwargs, shape = GCP_CONFIGS[name]
    torch.manual_seed(0)
    eager = CovariancePooling(8, **kwargs).to(dtype)
    scripted = _script(copy.deepcopy(eager))
    _train_and_eval(eager, scripted, shape, dtype, steps=2)


def test_save_load_round_trip_keeps_values_buffers_and_training() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(DecorrelatedBatchNorm(6, groups=2), CovariancePooling(6, reduced=4)).double()
    scripted = _script(copy.deepcopy(eager))
    x = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    _close(scripted(x), eager(x), torch.float64, "train step before saving")
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    _same_buffers(eager, loaded, torch.float64)
    _train_and_eval(eager, loaded, (5, 6, 3, 3), torch.float64, steps=2)


def test_scripted_module_shares_parameters_and_buffers() -> None:
    """torch.jit.script of a module keeps its tensors: the scripted training step updates the
    original module's running statistics in place."""
    module = DecorrelatedBatchNorm(4)
    scripted = _script(module)
    scripted(torch.randn(8, 4))
    assert int(module.num_batches_tracked) == 1
    assert not torch.equal(module.running_mean, torch.zeros_like(module.running_mean))


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_scripted_dbn_non_finite_batch_like_eager(nonfinite: str) -> None:
    """CPU: "raise" raises before anything changes (TorchScript reports orthofx's InputError as a
    torch.jit.Error naming it); "skip" keeps the statistics and counts the batch."""
    eager = DecorrelatedBatchNorm(4, nonfinite=nonfinite)
    scripted = _script(copy.deepcopy(eager))
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    if nonfinite == "raise":
        with pytest.raises(orthofx.InputError, match="NaN or Inf"):
            eager(x)
        with pytest.raises(torch.jit.Error, match=r"InputError.*NaN or Inf"):
            scripted(x)
    else:
        eager(x)
        scripted(x)
        assert int(scripted.nonfinite_batches) == int(eager.nonfinite_batches) == 1
    _same_buffers(eager, scripted, torch.float32)
    assert int(scripted.num_batches_tracked) == 0


def test_scripted_covariance_pooling_non_finite_bn_statistics_restored() -> None:
    eager = CovariancePooling(4, reduced=3, nonfinite="skip")
    scripted = _script(copy.deepcopy(eager))
    x = torch.randn(3, 4, 3, 3)
    x[0, 0, 0, 0] = float("inf")
    eager(x)
    scripted(x)
    assert int(scripted.nonfinite_batches) == int(eager.nonfinite_batches) == 1
    _same_buffers(eager, scripted, torch.float32)


def test_traced_modules_match_eager_in_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DecorrelatedBatchNorm(6), CovariancePooling(6, reduced=4)).double()
    model(torch.randn(8, 6, 3, 3, dtype=torch.float64))
    model.eval()
    x = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(model, (x,))
    _close(traced(x), model(x), torch.float64, "traced eval output")


def _spd(n: int, batch: int = 2, rank: int | None = None) -> Tensor:
    f = torch.randn(batch, n, rank or n + 2, dtype=torch.float64)
    return f @ f.mT / f.shape[-1]


def _sym(a: Tensor) -> Tensor:
    return (a + a.mT) / 2  # the decompositions read a symmetric input (the modules symmetrise it)


OPS = {
    "spectral_sqrtm-eigh-inverse": (lambda a: torch.ops.orthofx.spectral_sqrtm(_sym(a), True, 1e-2, "eigh")[0], _spd),
    "spectral_sqrtm-svd": (lambda a: torch.ops.orthofx.spectral_sqrtm(_sym(a), False, 1e-3, "svd")[0], _spd),
    "ns_sqrtm": (lambda a: torch.ops.orthofx.ns_sqrtm(a, 5, True), _spd),
    "gram_sqrtm": (lambda z: torch.ops.orthofx.gram_sqrtm(z, 1e-2, True, "eigh")[0],
                   lambda n: torch.randn(2, n, 3, dtype=torch.float64)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_operator_backward_is_the_derivative(name: str) -> None:
    """gradcheck (float64) of each operator's registered backward."""
    fn, make = OPS[name]
    torch.manual_seed(0)
    a = make(4).requires_grad_()
    assert torch.autograd.gradcheck(fn, (a,))


@pytest.mark.parametrize("name", ["spectral_sqrtm", "ns_sqrtm", "gram_sqrtm"])
def test_operator_registration(name: str) -> None:
    """Schema, autograd registration and fake (meta) kernel of each operator (torch.library.opcheck)."""
    a = _spd(4).requires_grad_()
    args = {"spectral_sqrtm": (a, True, 1e-3, "eigh"), "ns_sqrtm": (a, 5, False),
            "gram_sqrtm": (torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True), 1e-2, False, "eigh")}[name]
    torch.library.opcheck(getattr(torch.ops.orthofx, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_stable_decomposition_refuses_script_and_names_strip() -> None:
    """StableDecomposition (raw-call signature ``(A, *args, **kwargs)``, per-kind return types) has
    no TorchScript path: a ScriptingError names it and orthofx.strip, which puts the torch call back."""
    from orthofx.errors import ScriptingError
    from orthofx.nn import StableDecomposition

    model = nn.Sequential(StableDecomposition.for_target(torch.linalg.eigvalsh))
    with pytest.raises(ScriptingError,
                       match=r"StableDecomposition cannot be compiled by torch\.jit\.script.*orthofx\.strip"):
        _script(model)


def test_saved_script_loads_in_a_fresh_process_after_importing_orthofx_nn(tmp_path) -> None:
    """The operators are registered by ``import orthofx.nn`` (``import orthofx`` alone is lazy):
    without it torch.jit.load reports the unknown op; with it the loaded module gives the saved
    module's output."""
    import subprocess
    import sys

    torch.manual_seed(0)
    module = _script(nn.Sequential(DecorrelatedBatchNorm(4), CovariancePooling(4)).double())
    x = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    module(x)
    module.eval()
    torch.jit.save(module, str(tmp_path / "m.pt"))
    torch.save({"x": x, "y": module(x)}, tmp_path / "io.pt")
    code = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "try:\n"
        "    torch.jit.load(sys.argv[1])\n"
        "    print('loaded without orthofx')\n"
        "except RuntimeError as exc:\n"
        "    assert 'Unknown builtin op: orthofx::' in str(exc), exc\n"
        "import orthofx.nn\n"
        "m = torch.jit.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "torch.testing.assert_close(m(io['x']), io['y'], atol=1e-10, rtol=1e-10)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]
