"""What the training device asks of a run: its checks and numerics before the run, and what the
first line says about how the model runs there."""

from __future__ import annotations

import torch

from charlm.config.train import TrainConfig
from charlm.errors import CharlmError, UsageError
from charlm.model.config import ModelConfig
from charlm.system.devices import auto_note, describe, keep_freed_memory, select_device, set_tf32
from charlm.training import distributed

# Mixed precision measured on one NVIDIA H200 (torch 2.11, cuDNN 9.19), default GRU 2x256, 300
# steps: fp32 252K tokens/s, bf16 214K, fp16 217K: at this size the casts cost more than the
# halved products save. Larger models are not measured yet (scripts/gpu_check.sh's throughput
# rows); up to this hidden size the trainer says so.
MIXED_PRECISION_SLOWER_UP_TO_HIDDEN = 256


def setup_device(cfg: TrainConfig, group: distributed.Group, ckpt: dict | None) -> torch.device:
    device = select_rank_device(cfg.device, group, cfg.cell)
    if device.type == "cpu":
        keep_freed_memory()  # no page-fault churn from freeing each step's activations
    if cfg.precision != "fp32" and device.type != "cuda":
        raise UsageError(f"--precision {cfg.precision} needs a CUDA device; use fp32 on {device.type}")
    if cfg.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic "
            "(it needs an Ampere or newer GPU); use --precision fp16 or fp32"
        )
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    check_world(group, cfg.batch_size, ckpt.get("world_size", 1) if ckpt else None)
    return device


def select_rank_device(spec: str, group: distributed.Group, cell: str | None = None) -> torch.device:
    """auto / cuda: one GPU per rank, cuda:LOCAL_RANK; cpu: every rank on the CPU."""
    if not group.active:
        return select_device(spec, cell)
    spec = (spec or "auto").strip().lower()
    if spec.startswith("cuda:"):
        raise UsageError(
            f"--device {spec} names one GPU, but each of the {group.world_size} processes uses "
            "its own (cuda:LOCAL_RANK); use --device cuda, or CUDA_VISIBLE_DEVICES to choose GPUs"
        )
    if spec == "mps":
        raise UsageError("--device mps cannot train on several processes; use --device cpu")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return select_device("cpu")
    select_device("cuda")  # a clear error when CUDA is missing
    count = torch.cuda.device_count()
    if group.local_rank >= count:
        raise CharlmError(
            f"rank {group.rank} would use cuda:{group.local_rank} but this machine has {count} "
            f"GPU(s); start at most {count} processes per machine, or use --device cpu"
        )
    device = torch.device("cuda", group.local_rank)
    torch.cuda.set_device(device)
    return device


def check_world(group: distributed.Group, batch_size: int, saved_world_size: int | None) -> None:
    world = group.world_size
    if batch_size % world:
        up = -(-batch_size // world) * world
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must be divisible by the number "
            f"of processes ({world}); use e.g. --batch-size {up}"
        )
    if saved_world_size is not None and saved_world_size != world:
        how = f"--nproc {saved_world_size}" if saved_world_size > 1 else "one process"
        raise CharlmError(
            f"the checkpoint comes from a run on {saved_world_size} process(es) but this one has "
            f"{world}; resume it on as many ({how}, or torchrun with that many in all)"
        )


def device_text(cfg: TrainConfig, device: torch.device) -> str:
    """The device as the first line shows it, with what --device auto passed over."""
    note = auto_note(cfg.device, cfg.cell)
    return f"{describe(device)}; {note}" if note else describe(device)


def impl_text(mc: ModelConfig, device: torch.device) -> str:
    """Which implementation runs, and for `fast` which time loops."""
    if mc.impl != "fast":
        return mc.impl
    if mc.cell != "gru":  # the min cells' loops (charlm.model.minkernel)
        from charlm.model import minkernel

        return f"fast: {minkernel.status() if device.type == 'cpu' else 'torch loops'}"
    if device.type != "cpu":
        return (f"fast: TorchScript loops on {device.type}; the C loops are CPU-only, and "
                "--impl fused (cuDNN) is faster here")
    from charlm.model import ckernel

    return f"fast: {ckernel.status()}"  # says so when the slower fallback loops run


def precision_note(cfg: TrainConfig) -> str | None:
    """A warning when mixed precision was measured slower than fp32 for a model this small."""
    if cfg.precision == "fp32" or cfg.hidden > MIXED_PRECISION_SLOWER_UP_TO_HIDDEN:
        return None
    return (f"--precision {cfg.precision} was measured slower than fp32 for the 2x256 GRU on an "
            "H200 (bf16 0.85x, fp16 0.86x): at this size the casts cost more than the half-width "
            f"products save, so fp32 is likely faster for hidden {cfg.hidden}")
