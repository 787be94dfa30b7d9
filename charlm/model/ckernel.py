"""The compiled time loops of FastGRU: built on first use, cached, loaded with ctypes.

``fastgru_kernel.c`` runs a GRU layer's forward and backward time loops in C, calling the BLAS
that torch links (MKL's packed GEMM, exported by libtorch_cpu on x86-64 Linux wheels). It needs a C
compiler the first time (``$CC``, else ``cc``); the shared object is cached under
``$CHARLM_KERNEL_DIR``, else ``$XDG_CACHE_HOME/charlm/kernels``, else ``~/.cache/charlm/kernels``,
keyed by the source, the flags, the compiler and the CPU, and written atomically (temp + rename),
so concurrent processes may build it at once.

Where anything is missing (no compiler, no MKL symbols in this torch, an unwritable cache, or
``CHARLM_KERNEL=0``), ``load()`` returns None and FastGRU runs its TorchScript loops instead: the
same results, somewhat slower. ``status()`` says which, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fastgru_kernel.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared", "-fopenmp")
ABI = 6
_BLAS = ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute", "MKL_Set_Num_Threads_Local")



def kernel_dir() -> Path:
    if os.environ.get("CHARLM_KERNEL_DIR"):
        return Path(os.environ["CHARLM_KERNEL_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "charlm" / "kernels"


def _torch_blas():
    """ctypes handles of MKL's packed-GEMM functions inside torch, or None."""
    names = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}
    lib = Path(torch.__file__).parent / "lib" / names.get(sys.platform, "libtorch_cpu.so")
    try:
        handle = ctypes.CDLL(str(lib))  # already loaded by `import torch`: no second copy
        return [getattr(handle, name) for name in _BLAS]
    except (OSError, AttributeError):
        return None


def _cpu_id() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(l for l in lines if l.startswith(("model name", "flags")))[:4000]
    except OSError:
        return platform.processor()


def _build(cc: str, source: Path = SOURCE, stem: str = "fastgru") -> Path:
    """Compile a kernel (this one, or `source`: charlm.model.minkernel's) into the cache (unless
    there already) and return the .so path."""
    src = source.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join(
        [src, " ".join(FLAGS).encode(), version.encode(), platform.machine().encode(), _cpu_id().encode()]
    )).hexdigest()[:16]
    out = kernel_dir() / f"{stem}-{key}.so"
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_trusted(out.parent, folder=True)
    if out.is_file():
        _check_trusted(out)
        return out
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[-1:] or ['?']}")
        os.chmod(tmp, 0o755)  # whatever the umask: never writable by others (see _check_trusted)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class Untrusted(Exception):
    """A cached library (or its folder) someone else could have written: never loaded."""


def _check_trusted(path: Path, folder: bool = False) -> None:
    """Loading a library runs its code: it must be the user's own (or root's) and writable by
    no one else, and so must its folder, unless the folder is sticky like /tmp (then others
    cannot replace what is yours)."""
    st = os.stat(path)
    if st.st_uid not in (os.getuid(), 0):
        raise Untrusted(f"{path} belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o022 and not (folder and st.st_mode & stat.S_ISVTX):
        raise Untrusted(f"{path} is writable by other users")


def compile_library(source: Path, stem: str, abi_function: str, abi: int,
                    missing: str | None = None) -> tuple[ctypes.CDLL | None, str]:
    """(the library built from `source` and opened, "") or (None, why not): CHARLM_KERNEL=0, not
    Linux, `missing` (a requirement the caller found absent), no compiler, an untrusted cache, a
    failed build, or a cached library of another ABI. The one way a kernel of charlm's is had."""
    if os.environ.get("CHARLM_KERNEL", "1") == "0":
        return None, "disabled by CHARLM_KERNEL=0"
    if not sys.platform.startswith("linux"):
        return None, f"not built on {sys.platform} (Linux only)"
    if missing:
        return None, missing
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (set CC, or install gcc)"
    try:
        lib = ctypes.CDLL(str(_build(cc, source, stem)))
        if getattr(lib, abi_function)() != abi:
            return None, "stale kernel in the cache"
    except Untrusted as e:
        return None, f"not loaded: {e}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"build failed: {e}"
    return lib, ""


class LazyLibrary:
    """A kernel opened once per process, on first use, by `opener` (-> (library or None, a few
    words on which loops run)); `fallback` names the loops used without it."""

    def __init__(self, opener, fallback: str):
        self._opener, self._fallback = opener, fallback
        self._lock = threading.Lock()
        self._state: dict = {}  # "lib": CDLL | None, "why": str

    def load(self):
        """The kernel library, or None where it cannot be had (see ``status``)."""
        with self._lock:
            if "lib" not in self._state:
                self._state["lib"], self._state["why"] = self._opener()
            return self._state["lib"]

    def status(self) -> str:
        """A few words on the loops used in this process."""
        lib = self.load()
        why = self._state["why"]
        return why if lib is not None else f"{self._fallback} ({why})"

    def reset(self) -> None:
        """Forget the loaded state (tests; the next ``load`` looks again)."""
        with self._lock:
            self._state.clear()


def _load():
    blas = _torch_blas()
    lib, why = compile_library(SOURCE, "fastgru", "charlm_gru_abi", ABI, missing=None if blas else
                               "this torch exports no MKL packed GEMM (cblas_sgemm_pack)")
    if lib is None:
        return None, why
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    I32 = ctypes.c_int
    lib.charlm_gru_init.argtypes = [P, P, P, P]
    lib.charlm_gru_init.restype = None
    lib.charlm_gru_init(*(ctypes.cast(f, P) for f in blas))
    lib.charlm_gru_forward.argtypes = [I64, I64, I64, P, P, P, P, P, P, I32]
    lib.charlm_gru_backward.argtypes = [I64, I64, I64, P, P, P, P, P, I32]
    lib.charlm_gru_forward.restype = lib.charlm_gru_backward.restype = I32
    return lib, "compiled C loops + MKL packed GEMM"


_library = LazyLibrary(_load, "TorchScript loops")
load, status, reset = _library.load, _library.status, _library.reset


def usable(*tensors: torch.Tensor) -> bool:
    """True when the C loops apply: float32 tensors on the CPU, and the kernel loaded."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and load() is not None


def _dims(*dims: int) -> tuple[int, ...]:
    if max(dims) >= 2**31 // 5:
        raise ValueError("FastGRU's C loops take batch, length and hidden sizes under 429,496,729")
    return dims


def _check(rc: int) -> None:
    if rc:
        raise MemoryError("FastGRU: out of memory for the packed recurrent weight")


def forward(XP, h0, w_hh, b_hh, Y, M) -> None:
    """Y (and M, unless None) from XP = x W_ih^T + b_ih; all contiguous, batch first."""
    B, T, H = Y.shape
    _check(load().charlm_gru_forward(
        *_dims(B, T, H), XP.data_ptr(), h0.data_ptr(), w_hh.data_ptr(), b_hh.data_ptr(),
        Y.data_ptr(), None if M is None else M.data_ptr(), torch.get_num_threads()))


def backward(dY, M, w_hh, D, g) -> None:
    """D from dY and M; g holds dL/dh_T on the way in and dL/dh_0 on the way out."""
    B, T, H = dY.shape
    _check(load().charlm_gru_backward(
        *_dims(B, T, H), dY.data_ptr(), M.data_ptr(), w_hh.data_ptr(), D.data_ptr(), g.data_ptr(),
        torch.get_num_threads()))
