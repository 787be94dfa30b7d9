"""Generation's memory is flat in --length, for every --num-samples and for --beam.

One sample streams to stdout as it is drawn; several samples, a beam and --json are drawn into
a spool (charlm.system.spool: an unnamed temp file of int32 rows) and printed from it a chunk at a
time. Checked two ways, neither timed: structurally (what the spool holds in memory and on
disk, for samples and for a beam's pointers), and by Python's allocations (tracemalloc) while
a whole `charlm generate` draws, in a fresh process at a length N and at 4N, output to /dev/null.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from charlm.system import spool as spool_module
from charlm.inference.beam import beam_search
from charlm.inference.sample import SampleSettings, generate
from charlm.system.spool import IdSpool
from charlm.inference.loading import load_model
from helpers import run_main

pytestmark = pytest.mark.usefixtures("one_thread")

GROWTH = """
import os, sys, tracemalloc
import charlm.inference.sample, charlm.system.spool
from charlm.cli.app import main
charlm.system.spool.BLOCK_STEPS, charlm.system.spool.READ_STEPS = 64, 256  # lengths well past both
seen, real = [0, 0, 0], charlm.inference.sample._Stepper.step  # steps, allocations at step 100, most

def step(self, x, states):  # Python's allocations now, at every step of the drawing
    seen[0] += 1
    if seen[0] >= 100:
        now = tracemalloc.get_traced_memory()[0]
        seen[1], seen[2] = seen[1] or now, max(seen[2], now)
    return real(self, x, states)

charlm.inference.sample._Stepper.step = step
sys.stdout = open(os.devnull, "w")
tracemalloc.start()
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
sys.stderr.write(str(seen[2] - seen[1]) + "\\n")
"""


def growth_bytes(args: list[str]) -> int:
    """How much Python's allocations grew while `charlm ARGS` drew, after its 100th step."""
    done = subprocess.run([sys.executable, "-c", GROWTH, *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--num-samples", "2"], ["--num-samples", "3", "--json"],
                                   ["--json"]], ids=["two", "three-json", "one-json"])
def test_python_allocations_do_not_grow_while_drawing(tiny_run, extra):
    base = ["generate", "--checkpoint", str(tiny_run / "run" / "best.pt"), "--seed", "1", *extra]
    short, long = (growth_bytes([*base, "--length", str(n)]) for n in (1_500, 6_000))
    # before the spool, every step kept one more tensor: 4,500 more steps, >= 400 KB more
    assert long < 40_000 and short < 40_000, (short, long)


def test_the_spool_holds_one_block_in_memory_and_every_id_on_disk(tiny_run, monkeypatch):
    model = load_model(str(tiny_run / "run" / "best.pt"), None, "cpu", "raw").model
    settings = SampleSettings(length=5_000, num_samples=3, seed=4)
    reference = generate(model, [5, 6], SampleSettings(**settings.to_dict()))
    seen = []
    real_append = IdSpool.append

    def append(self, row):
        real_append(self, row)
        seen.append(len(self._pending))

    monkeypatch.setattr(IdSpool, "append", append)
    with IdSpool(3) as spool:
        assert generate(model, [5, 6], settings, spool=spool, keep=False) == []
        assert max(seen) < spool_module.BLOCK_STEPS and len(seen) == 5_000
        assert spool.steps == 5_000 and spool._file.seek(0, 2) == 5_000 * 3 * 4
        assert spool.lists() == reference
        chunks = list(spool.column(1))
    assert [len(c) for c in chunks] == [5_000] and chunks[0] == reference[1]


@pytest.mark.parametrize("beam, length", [(1, 1), (3, 7), (5, 300), (2, 3_000)])
def test_a_beam_read_back_from_its_pointers_is_the_same_search(tiny_run, beam, length,
                                                              monkeypatch):
    model = load_model(str(tiny_run / "run" / "best.pt"), None, "cpu", "raw").model
    monkeypatch.setattr(spool_module, "READ_STEPS", 64)  # many blocks, read from the end
    found = beam_search(model, [3, 4], beam, length)
    with IdSpool(beam) as spool:
        spooled = beam_search(model, [3, 4], beam, length, spool=spool)
        assert [h.ids for h in spooled] == [[]] * beam and spool.steps == length
        assert spool.lists() == [h.ids for h in found]
    assert [h.log_prob for h in spooled] == [h.log_prob for h in found]
    if length <= 300:  # the reference: each hypothesis's log-probability, scored in one pass
        for h in found:
            x = torch.tensor([[3, 4, *h.ids[:-1]]])
            logp = torch.log_softmax(model(x)[0][0, 1:].double().index_fill(
                -1, torch.tensor([0]), float("-inf")), -1)
            assert logp.gather(1, torch.tensor(h.ids)[:, None]).sum().item() == \
                pytest.approx(h.log_prob, rel=1e-8, abs=1e-6)  # float32 steps


@pytest.mark.parametrize("extra", [["--num-samples", "3"], ["--num-samples", "2", "--json"],
                                   ["--beam", "3", "--num-samples", "2"]])
def test_printed_from_the_spool_is_what_the_library_draws(tiny_run, extra, monkeypatch):
    monkeypatch.setattr(spool_module, "READ_STEPS", 100)  # the text crosses many chunks
    loaded = load_model(str(tiny_run / "run" / "best.pt"), None, "cpu", "auto")
    code, out, err = run_main(["generate", "--checkpoint", str(tiny_run / "run" / "best.pt"),
                               "--prefix", "the ", "--length", "1000", "--seed", "9", "-q",
                               *extra])
    assert (code, err) == (0, "")
    prefix = loaded.vocab.encode("the ").tolist()
    if "--beam" in extra:
        rows = [h.ids for h in beam_search(loaded.model, prefix, 3, 1000)[:2]]
    else:
        n = int(extra[1])
        rows = generate(loaded.model, prefix, SampleSettings(length=1000, num_samples=n, seed=9))
    samples = [loaded.vocab.decode(r) for r in rows]
    if "--json" in extra:
        assert json.loads(out)["samples"] == samples
    else:
        assert out == "\n\n".join("the " + s for s in samples) + "\n"
