"""Where a training step's time goes: data, forward (with the loss), backward, clipping, the
optimizer, timed part by part over the trainer's own model, optimizer and batches.

    python scripts/profile_step.py [--config configs/timemachine-gru.toml] [--steps 100]
        [--threads 0] [--ops 15]

The parts are timed with the wall clock around each (the CPU runs them synchronously); after
--warmup steps, medians per step. --ops N adds torch.profiler's N most expensive ops (self CPU
time) over a few more steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "timemachine-gru.toml"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ops", type=int, default=0)
    args = p.parse_args(argv)
    if "CHARLM_MIRROR" not in os.environ and SHARED.is_dir():
        os.environ["CHARLM_MIRROR"] = str(SHARED)
    sys.path.insert(0, str(REPO))
    import tempfile

    import torch
    import torch.nn.functional as F

    from charlm.config.build import build_config
    from charlm.config.file import load_config_file
    from charlm.training.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    values = dict(load_config_file(args.config), device="cpu", time_budget="0",
                  max_steps=args.warmup + args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CHARLM_RUNS_DIR"] = tmp
        t = Trainer(build_config({}, values))
    model, opt, cfg = t.model.train(), t.optimizer, t.cfg
    params = list(model.parameters())
    batches = iter(t.batches)
    parts = {k: [] for k in ("data", "forward", "backward", "clip", "optimizer")}
    state = None
    clock = time.perf_counter

    def step(record: bool):
        nonlocal state, batches
        t0 = clock()
        try:
            X, Y = next(batches)
        except StopIteration:
            batches, state = iter(t.batches), None
            X, Y = next(batches)
        t1 = clock()
        logits, state = model(X, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), Y.reshape(-1).long())
        t2 = clock()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = clock()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        t4 = clock()
        opt.step()
        t5 = clock()
        state = state.detach() if isinstance(state, torch.Tensor) else tuple(s.detach() for s in state)
        if record:
            for k, a, b in zip(parts, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                parts[k].append(b - a)

    for i in range(args.warmup + args.steps):
        step(i >= args.warmup)
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    tokens = cfg.batch_size * cfg.num_steps
    print(f"{args.config}: {cfg.cell} {cfg.layers}x{cfg.hidden}, embed {cfg.embed}, batch "
          f"{cfg.batch_size}x{cfg.num_steps}, {cfg.optimizer}; impl {t.model_config.impl}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"step {total * 1e3:.2f} ms (medians of parts), {tokens / total:,.0f} tokens/s")
    for k, v in med.items():
        print(f"  {k:10s} {v * 1e3:8.2f} ms  {v / total:6.1%}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step(False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
