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
from pathlib import Path

import torch

from charlm.model.ckernel import LazyLibrary, compile_library

SOURCE = Path(__file__).with_name("mincells_kernel.c")
ABI = 1

def _load():
    lib, why = compile_library(SOURCE, "mincells", "charlm_min_abi", ABI)
    if lib is None:
        return None, why
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.charlm_min_forward.argtypes = [I64, I64, I64, I32, P, P, P, I32]
    lib.charlm_min_backward.argtypes = [I64, I64, I64, I32, P, P, P, P, P, P, I32]
    lib.charlm_min_forward.restype = lib.charlm_min_backward.restype = None
    return lib, "compiled C loops"


_library = LazyLibrary(_load, "torch loops")
load, status, reset = _library.load, _library.status, _library.reset


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
