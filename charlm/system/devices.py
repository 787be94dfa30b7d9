"""Picking the device (auto = CUDA, then Apple MPS but not for a GRU, then CPU) and its
numerics (TF32)."""

from __future__ import annotations

import warnings

import torch

from charlm.errors import CharlmError, UsageError

# Why --device auto does not pick MPS for a GRU: published reports measure PyTorch's GRU on MPS
# slower than on the CPU (pytorch/pytorch#123148) and producing NaN (#94691). Not measured here
# (no Mac); --device mps still uses it.
MPS_SKIPPED_FOR = ("gru",)
MPS_NOTE = ("auto skipped MPS for the GRU: slower than the CPU and NaN in published reports, "
            "pytorch#123148, #94691; --device mps to use it")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def auto_note(spec: str | None, cell: str | None) -> str | None:
    """What --device auto passed over, for the first line: the MPS note, or None."""
    skipped = ((spec or "auto").strip().lower() == "auto" and cell in MPS_SKIPPED_FOR
               and not torch.cuda.is_available() and mps_available())
    return MPS_NOTE if skipped else None


def select_device(spec: str = "auto", cell: str | None = None) -> torch.device:
    """The device `spec` names; `cell`, when known, lets auto pass over MPS for a GRU. A CUDA
    device becomes the current one, so kernels and generators of cuda:N are cuda:N's."""
    spec = (spec or "auto").strip().lower()
    mps_ok = mps_available()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_ok and cell not in MPS_SKIPPED_FOR:
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_ok:
            raise CharlmError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CharlmError(
                f"--device {spec}: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use --device cpu or auto"
            )
        index = spec.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise CharlmError(
                    f"--device {spec}: no such GPU; this machine has {torch.cuda.device_count()} "
                    "(cuda:0 .. cuda:N-1)"
                )
            torch.cuda.set_device(int(index))
        return torch.device("cuda", torch.cuda.current_device())
    raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {spec!r}")


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matrix products and cuDNN (Ampere and newer GPUs): faster,
    with a 10-bit mantissa in the products. charlm decides, not torch's defaults (which differ
    between matmul and cuDNN): the trainer's --tf32, and always off for eval perplexity (and
    the figures export writes on the card)."""
    # The allow_tf32 flags, not torch >= 2.9's fp32_precision ones: once those are set, torch's
    # own code that still reads the old flags (torch.export, which `charlm export --format onnx`
    # runs after eval's figures) fails with "a mix of the legacy and new APIs" (torch 2.13).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old flags are deprecated; they still work
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return str(device)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step allocates and frees the same few megabytes of activations every step.
    By default glibc returns big blocks to the kernel on free (mmap/trim), so every step
    page-faults that memory back in, zeroed: hundreds of faults per step, a noticeable share of
    a small GRU's step (docs/BENCHMARKS.md). A trainer's memory use stays at its peak
    anyway. Linux/glibc only; returns whether the setting took.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        # blocks under 512 MiB (where glibc allows; else its 32 MiB cap) come from the heap, and
        # up to 1 GiB free at the heap's top is kept
        mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, 512 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return bool(mmap_ok and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
