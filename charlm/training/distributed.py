"""Data-parallel training over several processes (ranks): torchrun, or `charlm train --nproc N`.

Every rank holds the whole model and lays out the same global batches from the same seed; it
keeps only its own rows, so each carried hidden-state row stays on one rank::

    global batch, B = 8 rows, W = 2 ranks
    rows 0..3 -> rank 0     rows 4..7 -> rank 1     (rank r: rows [r*B/W, (r+1)*B/W))

DistributedDataParallel averages the gradients, which then equal those of the global batch on
one process. Two process groups: the default one (gloo for CPU tensors, NCCL for CUDA ones)
carries DDP's gradients; a gloo group on the host carries the small control messages (errors,
the per-step stop/elapsed agreement, metrics, checkpoint gathers), so none of them touches
the GPU stream. The per-step agreement runs one step behind (`agree_stop`), so no step waits
for it.

A rank that hits a user error shares it: every rank raises it and only rank 0 prints it.
"""

from __future__ import annotations

import datetime
import inspect
import os
import signal
from typing import Any, Callable, TypeVar

import torch

from charlm.errors import CharlmError
from charlm.model.state import cat_states, map_state
from charlm.training.lifeline import stop_with_parent

T = TypeVar("T")

TIMEOUT_ENV = "CHARLM_DIST_TIMEOUT"  # seconds a collective may wait for the slowest rank
DEFAULT_TIMEOUT_S = 600


class SharedError(CharlmError):
    """An error every rank raises alike; rank 0 reports it, the others exit quietly."""

    on_every_rank = True

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def shared(exc: CharlmError) -> SharedError:
    return SharedError(str(exc), exc.exit_code)


class Group:
    """One process, no process group: every method is the identity (the single-process run)."""

    rank, world_size, local_rank = 0, 1, 0
    active = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def together(self, fn: Callable[[], T]) -> T:
        """Run fn on every rank; if it raises a CharlmError on any, it is raised on all."""
        return fn()

    def local_first(self, fn: Callable[[], T]) -> T:
        """Run fn on each machine's first rank, then on the others (they find caches filled)."""
        return fn()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run fn on rank 0 only (None elsewhere); its CharlmError is raised on every rank."""
        return fn()

    def broadcast(self, value: T) -> T:
        """Rank 0's value, on every rank (plain data: tensors, numbers, strings, lists, dicts)."""
        return value

    def gather(self, value: T) -> list[T] | None:
        """Every rank's value, in rank order, on rank 0; None elsewhere."""
        return [value]

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def agree_stop(self, elapsed: float, stop_signal: list[str]) -> tuple[float, str | None]:
        """(elapsed, signal to stop for): the largest elapsed time and any rank's signal."""
        return elapsed, stop_signal[0] if stop_signal else None

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module whose forward runs the training step (DDP across ranks)."""
        return model

    def close(self) -> None:
        pass


class ProcessGroup(Group):
    """This process's place in a torch.distributed run (world size > 1)."""

    active = True

    def __init__(self, rank: int, world_size: int, local_rank: int, ctrl):
        self.rank, self.world_size, self.local_rank, self.ctrl = rank, world_size, local_rank, ctrl
        # The tensors of the latest collectives. Gloo's worker thread drops its references to a
        # finished operation's tensors a moment after the caller returns; were that the last
        # reference, it would need the GIL, and a process exiting right then aborts ("terminate
        # called without an active exception"). Holding them here until close() avoids that.
        self._keep: list[torch.Tensor] = []
        self._pending = None  # the stop agreement in flight: (work, its tensor)

    def _hold(self, *tensors: torch.Tensor) -> None:
        self._keep = [*self._keep[-16:], *tensors]

    def _exchange(self, value) -> list:
        """Every rank's value, in rank order, on every rank. Values travel as plain data
        (torch.save, read back with weights_only=True), in tensors owned by torch."""
        import io

        import torch.distributed as dist

        buf = io.BytesIO()
        torch.save(value, buf)
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).clone()
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.ctrl)
        longest = max(int(n) for n in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.ctrl)
        self._hold(size, padded, *sizes, *parts)
        return [torch.load(io.BytesIO(part[: int(n)].numpy().tobytes()), weights_only=True)
                for part, n in zip(parts, sizes)]

    def _agree(self, error: BaseException | None) -> None:
        if isinstance(error, CharlmError):
            mine = [str(error), error.exit_code]
        elif error is not None:
            mine = [f"{type(error).__name__}: {error}", 1]
        else:
            mine = None
        everyone = self._exchange(mine)
        if error is not None and not isinstance(error, CharlmError):
            raise error  # a bug: this rank shows the traceback, the others say which rank
        for rank, outcome in enumerate(everyone):
            if outcome is not None:
                message, code = outcome
                raise SharedError(message if rank == 0 else f"rank {rank}: {message}", code)

    def _attempt(self, fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
        try:
            return fn(), None
        except Exception as exc:  # shared with the other ranks by _agree
            return None, exc

    def together(self, fn):
        result, error = self._attempt(fn)
        self._agree(error)
        return result

    def local_first(self, fn):
        result, error = self._attempt(fn) if self.local_rank == 0 else (None, None)
        self._agree(error)
        if self.local_rank != 0:
            result, error = self._attempt(fn)
        self._agree(error)
        return result

    def on_main(self, fn):
        result, error = self._attempt(fn) if self.rank == 0 else (None, None)
        self._agree(error)
        return result

    def broadcast(self, value):
        return self._exchange(value if self.rank == 0 else None)[0]

    def gather(self, value):
        everyone = self._exchange(value)
        return everyone if self.rank == 0 else None

    def _reduce(self, values: list[float], op) -> list[float]:
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op, group=self.ctrl)
        self._hold(t)
        return t.tolist()

    def sum(self, values):
        import torch.distributed as dist

        return self._reduce(values, dist.ReduceOp.SUM)

    def agree_stop(self, elapsed, stop_signal):
        """One step behind: each call starts the reduction of this step's values and returns the
        previous call's result, which has long arrived, so a step waits for no rank here (DDP's
        gradient reduction keeps the ranks in step anyway). Every rank gets the same answer at
        the same step, so all stop after the same step and use the same elapsed time (which the
        LR schedule reads); a signal stops the run one step later than a blocking check would."""
        import torch.distributed as dist

        mine = signal.Signals[stop_signal[0]].value if stop_signal else 0
        values = torch.tensor([elapsed, mine], dtype=torch.float64)
        if self._pending is None:  # the first check has nothing earlier to read: agree now
            agreed = values.clone()
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.ctrl)
        else:
            work, agreed = self._pending
            work.wait()
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.ctrl, async_op=True)
        self._pending = (work, values)
        self._hold(agreed)
        elapsed, signum = agreed.tolist()
        return elapsed, signal.Signals(int(signum)).name if signum else None

    def wrap(self, model, device):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        import torch.distributed as dist

        if self._pending is not None:
            try:
                self._pending[0].wait()
            except RuntimeError:  # another rank is gone: nothing left to agree on
                pass
            self._pending = None
        self.ctrl = None  # unreferenced groups are torn down (their threads joined) at once
        if dist.is_initialized():
            dist.destroy_process_group()
        self._keep = []


SINGLE = Group()
_current: Group = SINGLE
_joined = False  # whether this process has been a rank of a process group


def current() -> Group:
    """The group `from_env` set up in this process, else the single-process one."""
    return _current


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CharlmError(
            f"environment variable {name}={raw!r} is not a whole number; start charlm with "
            "torchrun or `charlm train --nproc N`, which set it"
        ) from None


def peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away or never answered."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(exc)
    return _current.active and (isinstance(exc, dist_error) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "timed out",
                            "Timed out", "NCCL communicator was aborted")))


def timeout() -> datetime.timedelta:
    seconds = os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
    try:
        return datetime.timedelta(seconds=float(seconds))
    except ValueError:
        raise CharlmError(f"{TIMEOUT_ENV}={seconds!r} is not a number of seconds") from None


def from_env(device: str | None = None) -> Group:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    No torchrun variables, or a world of one: the plain single-process run, no group at all.
    With CUDA (unless `device`, the --device asked for, is the CPU) the rank's GPU,
    cuda:LOCAL_RANK, becomes the current device before the group exists and is named to it
    (device_id): NCCL's communicator then lives on that GPU, not every rank's on cuda:0.
    """
    global _current
    if _current.active:
        return _current
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world == 1:
        return SINGLE
    if world < 1 or not 0 <= rank < world:
        raise CharlmError(f"RANK={rank} WORLD_SIZE={world}: not a valid rank of a process group")
    stop_with_parent()
    import torch.distributed as dist

    if not dist.is_available():
        raise CharlmError("this torch build has no torch.distributed; run on one process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    extra = {}
    on_gpu = (torch.cuda.is_available() and (device or "auto").strip().lower() != "cpu"
              and local_rank < torch.cuda.device_count())
    if on_gpu:
        torch.cuda.set_device(local_rank)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            extra["device_id"] = torch.device("cuda", local_rank)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timeout(), **extra)
        ctrl = dist.new_group(backend="gloo") if "nccl" in backend else dist.group.WORLD
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CharlmError(f"rank {rank} could not join the process group: {first}") from None
    global _joined
    _current, _joined = ProcessGroup(rank, world, local_rank, ctrl), True
    return _current


def joined() -> bool:
    """Whether this process has been a rank of a process group (see `charlm.cli.app.main`)."""
    return _joined


def close() -> None:
    global _current
    _current.close()
    _current = SINGLE


def gather_state(group: Group, hidden, rng: dict) -> tuple[Any, dict]:
    """Collective: (the global batch's hidden state, extra checkpoint entries) on rank 0.

    The ranks' hidden rows are joined along the batch dimension, so `hidden` is laid out as a
    single process's; the entries add `world_size` and `rank_rng`, one RNG state per rank."""
    if not group.active:
        return hidden, {}
    everyone = group.gather([hidden, rng])
    if everyone is None:
        return None, {}
    hiddens, rngs = [h for h, _ in everyone], [r for _, r in everyone]
    joined = None if any(h is None for h in hiddens) else cat_states(hiddens, dim=1)
    return joined, {"world_size": group.world_size, "rank_rng": rngs}


def rank_state(group: Group, ckpt: dict, batch_size: int) -> tuple[Any, dict]:
    """This rank's (hidden rows, RNG state) from a checkpoint `gather_state` helped write."""
    hidden = ckpt.get("hidden")
    if not group.active:
        return hidden, ckpt["rng"]
    rngs = ckpt.get("rank_rng")
    if not isinstance(rngs, list) or len(rngs) != group.world_size:
        raise CharlmError("the checkpoint lacks one RNG state per rank; the file is damaged")
    rows = group.rows(batch_size)
    hidden = map_state(lambda h: h[:, rows], hidden)
    return hidden, rngs[group.rank]


def validation_nll(group: Group, model, tokens: torch.Tensor, batch_size: int, num_steps: int,
                   autocast: Callable) -> tuple[float, int]:
    """`charlm.inference.evaluate.corpus_nll` of the whole split; in a group each rank evaluates its rows
    of the same windows (`eval_shards`) and the sums are added up across ranks."""
    from charlm.inference.evaluate import corpus_nll as nll_of

    if not group.active:
        return nll_of(model, tokens, batch_size, num_steps, autocast=autocast())
    nll, count = 0.0, 0
    for start, stop, rows in eval_shards(tokens.numel(), batch_size, group.world_size, group.rank):
        part, n = nll_of(model, tokens[start:stop], rows, num_steps, autocast=autocast())
        nll, count = nll + part, count + n
    nll, count = group.sum([nll, count])
    return nll, int(count)


def eval_shards(num_tokens: int, batch_size: int, world_size: int, rank: int):
    """This rank's part of `charlm.data.batches.eval_windows(tokens, batch_size, ...)`.

    Yields (start, stop, rows): evaluating tokens[start:stop] with `rows` streams reproduces the
    rank's rows of the global layout (rank r: streams [r*B/W, (r+1)*B/W)); the last rank also
    takes the short final stream. Summed over the ranks, the loss and count equal one process's.
    """
    q, r = divmod(num_tokens - 1, batch_size)
    share = batch_size // world_size
    if q:
        yield rank * share * q, (rank + 1) * share * q + 1, share
    if r and rank == world_size - 1:
        yield batch_size * q, num_tokens, 1


def describe(group: Group) -> dict[str, Any]:
    return {"world_size": group.world_size} if group.active else {}
