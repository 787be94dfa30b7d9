"""The compiled time loops of the min cells' `fast` implementation (``mincells_kernel.c``).

Built on first use into ckernel's cache with ckernel's flags and checks (``charlm.model.ckernel``:
keyed by source, flags, compiler and CPU; written atomically; loaded only when it is the user's
own), and loaded with ctypes. Unlike FastGRU's loops these need no BLAS: the gate products are
torch's, one matrix product per window, before the loops run.

Where it cannot be had (no compiler, not Linux, ``CHARLM_KERNEL=0``), ``load()`` returns None and
the min cells run their torch loops instead (``charlm.model.mincells``): the same results,
slower. ``status()`` says which, and why.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from charlm.model import ckernel

SOURCE = Path(__file__).with_name("mincells_kernel.c")
ABI = 1

_lock = threading.Lock()
_state: dict = {}


def _load():
    if os.environ.get("CHARLM_KERNEL", "1") == "0":
        return None, "disabled by CHARLM_KERNEL=0"
    if not sys.platform.startswith("linux"):
        return None, f"not built on {sys.platform} (Linux only)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (set CC, or install gcc)"
    try:
        lib = ctypes.CDLL(str(ckernel._build(cc, SOURCE, "mincells")))
        if lib.charlm_min_abi() != ABI:
            return None, "stale kernel in the cache"
    except ckernel.Untrusted as e:
        return None, f"not loaded: {e}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"build failed: {e}"
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.charlm_min_forward.argtypes = [I64, I64, I64, I32, P, P, P, I32]
    lib.charlm_min_backward.argtypes = [I64, I64, I64, I32, P, P, P, P, P, P, I32]
    lib.charlm_min_forward.restype = lib.charlm_min_backward.restype = None
    return lib, "compiled C loops"


def load():
    """The kernel library, or None where it cannot be had (see ``status``)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = _load()
        return _state["lib"]


def status() -> str:
    lib = load()
    return _state["why"] if lib is not None else f"torch loops ({_state['why']})"


def reset() -> None:
    """Forget the loaded state (tests; the next ``load`` looks again)."""
    with _lock:
        _state.clear()


def usable(*tensors: torch.Tensor) -> bool:
    """True when the C loops apply: contiguous float32 CPU tensors, and the kernel loaded."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in tensors) and load() is not None


def forward(lstm: bool, gates: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h (B, T, H) from gates (B, T, G*H), or one step: h (B, H) from gates (B, G*H)."""
    B, T = gates.shape[0], gates.shape[1] if gates.dim() == 3 else 1
    H = h0.shape[-1]
    h = gates.new_empty(B, T, H) if gates.dim() == 3 else gates.new_empty(B, H)
    load().charlm_min_forward(B, T, H, int(lstm), gates.data_ptr(), h0.data_ptr(), h.data_ptr(),
                              torch.get_num_threads())
    return h


def backward(lstm: bool, gates, h0, h, dh) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, H = h.shape
    dgates, dh0 = torch.empty_like(gates), torch.empty_like(h0)
    load().charlm_min_backward(B, T, H, int(lstm), gates.data_ptr(), h0.data_ptr(), h.data_ptr(),
                               dh.data_ptr(), dgates.data_ptr(), dh0.data_ptr(),
                               torch.get_num_threads())
    return dgates, dh0
