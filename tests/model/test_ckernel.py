"""FastGRU's compiled loops (charlm/model/fastgru_kernel.c via charlm.model.ckernel): equal to nn.GRU, with
the hidden units split across threads; and the fallback to the TorchScript loops."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from charlm.model import ckernel
from charlm.system.devices import keep_freed_memory
from test_fastgru import assert_all_close, outputs_and_grads, pair

CAN_BUILD = (
    sys.platform.startswith("linux") and shutil.which("cc") is not None and ckernel._torch_blas() is not None
)


@pytest.fixture
def fresh_kernel(tmp_path, monkeypatch):
    """No kernel loaded yet, built into an empty folder; forgotten again afterwards."""
    monkeypatch.setenv("CHARLM_KERNEL_DIR", str(tmp_path / "kernels"))
    ckernel.reset()
    yield tmp_path / "kernels"
    ckernel.reset()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_the_kernel_builds_and_loads_where_it_can(fresh_kernel):
    if not CAN_BUILD:
        pytest.skip("needs Linux, a C compiler and a torch with MKL's packed GEMM")
    assert ckernel.load() is not None
    assert ckernel.status() == "compiled C loops + MKL packed GEMM"
    built = sorted(p.name for p in fresh_kernel.iterdir())
    assert len(built) == 1 and built[0].startswith("fastgru-") and built[0].endswith(".so")  # no temp left


def test_a_built_kernel_is_reused_not_rebuilt(fresh_kernel):
    if not CAN_BUILD:
        pytest.skip("needs Linux, a C compiler and a torch with MKL's packed GEMM")
    ckernel.load()
    (so,) = fresh_kernel.iterdir()
    stamp = so.stat().st_mtime_ns
    ckernel.reset()
    assert ckernel.load() is not None
    assert [p.stat().st_mtime_ns for p in fresh_kernel.iterdir()] == [stamp]


# (batch, time, input, hidden, layers): hidden 64+ splits across 2 threads, 72 and 100 unevenly
SHAPES = [(32, 35, 32, 256, 2), (5, 7, 9, 72, 1), (3, 4, 5, 100, 2), (9, 3, 4, 64, 1), (1, 1, 3, 40, 1),
          (4, 6, 3, 5, 2)]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_compiled_loops_equal_fused(shape, n_threads, threads):
    if not ckernel.load():
        pytest.skip(ckernel.status())
    threads(n_threads)
    B, T, I, H, layers = shape
    fused, fast = pair(I, H, layers)
    x = torch.randn(B, T, I, requires_grad=True)
    h0 = torch.randn(layers, B, H, requires_grad=True)
    assert ckernel.usable(x, h0, *fast.parameters())
    # weight gradients sum B x T terms: compare them relative to their size
    assert_all_close(outputs_and_grads(fused, x, h0), outputs_and_grads(fast, x, h0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_compiled_loops_without_grad(n_threads, threads):
    if not ckernel.load():
        pytest.skip(ckernel.status())
    threads(n_threads)
    fused, fast = pair(7, 96, 2)
    x = torch.randn(12, 9, 7)
    h0 = torch.randn(2, 12, 96).transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    with torch.no_grad():
        assert_all_close([fused(x, h0)], [fast(x, h0)])


def test_disabled_kernel_falls_back_to_torchscript_with_the_same_results(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CHARLM_KERNEL", "0")
    assert ckernel.load() is None
    assert ckernel.status() == "TorchScript loops (disabled by CHARLM_KERNEL=0)"
    fused, fast = pair(5, 72, 2)
    x = torch.randn(4, 6, 5, requires_grad=True)
    assert_all_close(outputs_and_grads(fused, x, None), outputs_and_grads(fast, x, None), atol=1e-4, rtol=1e-4)
    assert not fresh_kernel.exists()  # nothing built


def test_a_failing_compiler_falls_back_and_leaves_nothing(fresh_kernel, monkeypatch):
    if not sys.platform.startswith("linux") or ckernel._torch_blas() is None:
        pytest.skip("the compiler is only tried on Linux with MKL's packed GEMM")
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert ckernel.load() is None
    assert ckernel.status().startswith("TorchScript loops (build failed: ")
    assert list(fresh_kernel.iterdir()) == []  # the temp file is gone
    fused, fast = pair(3, 8, 1)
    x = torch.randn(2, 3, 3, requires_grad=True)
    assert_all_close(outputs_and_grads(fused, x, None), outputs_and_grads(fast, x, None))


def test_float64_uses_the_torchscript_loops():
    assert not ckernel.usable(torch.zeros(2, dtype=torch.float64))


def test_keep_freed_memory_takes_on_linux():
    assert keep_freed_memory() is sys.platform.startswith("linux")


# --- a cached library someone else could have written ------------------------------------------


def test_a_cached_library_others_could_have_written_is_not_loaded(fresh_kernel):
    """Loading a library runs its code: one that another user owns or may write (or whose folder
    they may write) is refused, and FastGRU runs its TorchScript loops instead."""
    import os

    if not CAN_BUILD:
        pytest.skip("needs Linux, a C compiler and a torch with MKL's packed GEMM")
    assert ckernel.load() is not None
    (so,) = fresh_kernel.iterdir()
    assert so.stat().st_mode & 0o777 == 0o755 and fresh_kernel.stat().st_mode & 0o777 == 0o700

    def status_after(change) -> str:
        change()
        ckernel.reset()
        ckernel.load()
        return ckernel.status()

    assert status_after(lambda: so.chmod(0o777)) == (
        f"TorchScript loops (not loaded: {so} is writable by other users)")
    fused, fast = pair(3, 8, 1)
    x = torch.randn(2, 3, 3, requires_grad=True)
    assert_all_close(outputs_and_grads(fused, x, None), outputs_and_grads(fast, x, None))
    assert status_after(lambda: so.chmod(0o755)) == "compiled C loops + MKL packed GEMM"
    assert status_after(lambda: fresh_kernel.chmod(0o777)) == (
        f"TorchScript loops (not loaded: {fresh_kernel} is writable by other users)")
    assert status_after(lambda: fresh_kernel.chmod(0o1777)) == "compiled C loops + MKL packed GEMM"
    if os.geteuid() == 0:  # only root can give a file away
        assert status_after(lambda: os.chown(so, 4242, -1)) == (
            f"TorchScript loops (not loaded: {so} belongs to uid 4242, not to you)")
