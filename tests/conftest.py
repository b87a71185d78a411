"""Shared test fixtures: which (backend, device) pairs can run here, the tolerance rule, one thread."""

from __future__ import annotations

import os

import pytest
import torch

from supanalysis._backend import backend_status

_STATUS = backend_status()


def backend_devices() -> list[tuple[str, str]]:
    """Every (backend, device) pair this machine can run; GPU pairs only with a GPU."""
    pairs = []
    for dev in ("cpu", "cuda"):
        for name, st in _STATUS.items():
            if st.available and dev in st.devices:
                pairs.append((name, dev))
    return pairs


BACKEND_DEVICES = backend_devices()
FAST_BACKEND_DEVICES = [(b, d) for b, d in BACKEND_DEVICES if not (b == "triton" and d == "cpu")]


def ids(pairs):
    return [f"{b}-{d}" for b, d in pairs]


@pytest.fixture(params=BACKEND_DEVICES, ids=ids(BACKEND_DEVICES))
def backend_device(request):
    return request.param


def interpreting(backend: str, device: str) -> bool:
    """Triton on the CPU runs in the (slow) interpreter: tests shrink their sizes for it."""
    return backend == "triton" and device == "cpu"


def assert_tolerance_rule(got, ref64, same_dtype, *, atol: float, what: str = "") -> None:
    """flash-attention's rule: |got - ref64| <= 2 |same_dtype - ref64| + atol (max norm)."""
    got = got.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    same = same_dtype.detach().double().cpu()
    fin = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: non-finite pattern differs"
    if fin.any():
        err = (got[fin] - ref64[fin]).abs().max().item()
        base = (same[fin] - ref64[fin]).abs().max().item()
        assert err <= 2 * base + atol, f"{what}: error {err:.3e} > 2 x {base:.3e} + {atol:.1e}"
    assert torch.equal(got[~fin], ref64[~fin]), f"{what}: infinities differ"


def pytest_report_header(config):
    lines = [str(s) for s in _STATUS.values()]
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    return lines


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the test: tiny forwards and batched toy matmuls are dominated
    by threading overhead, and the CI machine has two cores shared with everything else."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def assert_argmax_up_to_ties(argmax, W, *, tol: float, what: str = "argmax") -> None:
    """Each row's partner has the row's largest |cos| to within ``tol`` (float64, from ``W``
    as given); a zero row has none (-1). Rows whose best two partners are closer than the
    rounding of the fast path may pick either: kernels order their sums differently, so
    exact duplicates can differ in the last bit (seen with OpenBLAS on AMD under the
    Triton interpreter)."""
    Wd = W.detach().double().cpu()
    norms = Wd.norm(dim=1)
    unit = Wd / norms.clamp_min(1e-300)[:, None]
    C = (unit @ unit.T).abs().fill_diagonal_(-1.0)
    got = argmax.detach().cpu()
    for i in range(Wd.shape[0]):
        j = int(got[i])
        if norms[i] == 0 or Wd.shape[0] == 1:
            assert j == -1, f"{what}[{i}] = {j}: a zero row (or a lone one) has no partner"
            continue
        assert 0 <= j < Wd.shape[0] and j != i, f"{what}[{i}] = {j} is not another row"
        assert C[i, j] >= C[i].max() - tol, f"{what}[{i}] = {j}: |cos| {C[i, j]:.9f} < best {C[i].max():.9f} - {tol:g}"
