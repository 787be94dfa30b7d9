import itertools

import pytest
import torch

from charlm.data.batches import (
    LAYOUT,
    RandomBatches,
    SequentialBatches,
    eval_windows,
    split_tokens,
)
from charlm.errors import CharlmError, UsageError

ITERATORS = [SequentialBatches, RandomBatches]
SHAPES = [(1, 1), (2, 5), (3, 7), (4, 35), (32, 35)]  # (batch_size, num_steps)


def corpus(n: int, device: str = "cpu") -> torch.Tensor:
    """Token i is i: every value tells its own corpus position."""
    return torch.arange(n, dtype=torch.int32, device=device)


def one_epoch(it):
    return [(x.clone(), y.clone()) for x, y in it]


# --- splits -----------------------------------------------------------------------------------


def test_split_tokens_contiguous_views_val_test_from_the_end():
    t = corpus(1000)
    train, val, test = split_tokens(t, (0.8, 0.15, 0.05))
    assert (len(train), len(val), len(test)) == (800, 150, 50)
    assert torch.equal(torch.cat([train, val, test]), t)
    assert train.data_ptr() == t.data_ptr()  # views, not copies
    train, val, test = split_tokens(t)
    assert (len(train), len(val), len(test)) == (900, 100, 0)
    train, val, test = split_tokens(corpus(7), (0.5, 0.25, 0.25))  # floors go to train
    assert (train.tolist(), val.tolist(), test.tolist()) == ([0, 1, 2, 3, 4], [5], [6])
    # no float artifacts: 0.29 * 100 is 28.999999999999996 in binary
    assert [len(p) for p in split_tokens(corpus(100), (0.42, 0.29, 0.29))] == [42, 29, 29]


@pytest.mark.parametrize("fractions", [(0.9, 0.2, 0.0), (1.1, -0.1, 0.0), (0.9, 0.1), (0.5, float("nan"), 0.5)])
def test_split_tokens_rejects_bad_fractions(fractions):
    with pytest.raises(UsageError) as err:
        split_tokens(corpus(10), fractions)
    assert str(err.value) == (
        "split fractions must be three numbers >= 0 (train, validation, test) that sum to 1; "
        f"got {fractions}"
    )


def test_split_tokens_tolerates_rounding():
    train, val, test = split_tokens(corpus(10), (0.7, 0.2, 0.1 + 5e-7))
    assert len(train) + len(val) + len(test) == 10
    parts = split_tokens(corpus(10_000_000), (0.0, 0.5000005, 0.5))  # sums to 1 + 5e-7
    assert [len(p) for p in parts] == [0, 5_000_000, 5_000_000]


# --- both iterators ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ITERATORS)
@pytest.mark.parametrize("batch_size,num_steps", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_each_epoch_covers_its_usable_range_exactly_once(cls, batch_size, num_steps, seed):
    n = 3000
    it = cls(corpus(n), batch_size, num_steps, seed=seed)
    expected_len = (n - num_steps) // (batch_size * num_steps)
    assert len(it) == expected_len
    offsets = set()
    for epoch in range(3):
        assert (it.epoch, it.position) == (epoch, 0)
        batches = one_epoch(it)
        assert len(batches) == len(it)
        xs = torch.cat([x.flatten() for x, _ in batches])
        for x, y in batches:
            assert x.dtype == y.dtype == torch.int64
            assert x.shape == y.shape == (batch_size, num_steps)
            assert torch.equal(y, x + 1)  # targets are the next corpus position
            # every row is a contiguous run of the corpus
            assert torch.equal(x, x[:, :1] + torch.arange(num_steps))
        offset = int(xs.min())
        assert 0 <= offset <= it.slack and offset == it.epoch_offset(epoch)
        assert it.slack == n - 1 - len(it) * batch_size * num_steps >= num_steps - 1
        offsets.add(offset)
        used = len(it) * batch_size * num_steps
        assert sorted(xs.tolist()) == list(range(offset, offset + used))
        assert offset + used + 1 <= n  # every target exists
    assert it.epoch == 3
    if num_steps >= 7:
        assert len(offsets) > 1  # the offset changes from epoch to epoch


@pytest.mark.parametrize("cls", ITERATORS)
@pytest.mark.parametrize("n,batch_size,num_steps", [
    (10_000, 32, 35),  # the d2l book's size: 1,039 tokens of slack per epoch
    (3000, 4, 35), (1155, 32, 35), (2000, 1, 1), (777, 3, 7), (5000, 64, 32)])
def test_every_position_is_used_within_each_cycle_of_epochs(cls, n, batch_size, num_steps):
    """No position of the training split is left out for good: within every cycle of
    2 * num_steps epochs (70 for num_steps 35), each is an input and each but the first a
    target, while len() stays the same every epoch."""
    it = cls(corpus(n), batch_size, num_steps, seed=11)
    for cycle in range(2):
        inputs, targets = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        for _ in range(2 * num_steps):
            batches = one_epoch(it)
            assert len(batches) == len(it)
            for x, y in batches:
                inputs[x.flatten()] = True
                targets[y.flatten()] = True
        assert inputs[: n - 1].all() and targets[1:].all(), cycle


@pytest.mark.parametrize("cls", ITERATORS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_first_token_is_an_input_and_the_last_a_target_from_the_second_epoch_on(cls, seed):
    """d2l's iterators never reach one end of the split (its random offset includes 0 but the
    slack's end is never drawn): here, after any two or more epochs, every position of the
    training split has been an input and every position after the first a target."""
    n = 10_000
    it = cls(corpus(n), 32, 35, seed=seed)
    inputs, targets = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for epoch in range(5):
        for x, y in one_epoch(it):
            inputs[x.flatten()] = True
            targets[y.flatten()] = True
        if epoch >= 1:
            assert inputs[: n - 1].all() and not inputs[n - 1], epoch
            assert targets[1:].all() and not targets[0], epoch


def test_offsets_take_each_phase_at_both_ends_of_the_slack_once_per_cycle():
    it = SequentialBatches(corpus(10_000), 32, 35, seed=3)
    assert it.slack == 10_000 - 1 - 8 * 32 * 35  # 1,039
    for cycle in range(3):
        offsets = [it.epoch_offset(70 * cycle + k) for k in range(70)]
        assert sorted(offsets) == list(range(35)) + [it.slack - p for p in range(34, -1, -1)]
        assert sorted(offsets[:2]) == [0, it.slack]  # both ends first
        # then each phase at one end and the other in consecutive epochs
        assert all(min(a, b) + max(a, b) == it.slack and min(a, b) < 35
                   for a, b in zip(offsets[::2], offsets[1::2]))
    first, second = ([it.epoch_offset(70 * c + k) for k in range(70)] for c in (0, 1))
    assert first != second  # a new order every cycle
    assert [it.epoch_offset(e) for e in range(70)] == first  # a pure function of the epoch


@pytest.mark.parametrize("batch_size,num_steps", SHAPES)
def test_sequential_rows_continue_across_batches(batch_size, num_steps):
    it = SequentialBatches(corpus(3000), batch_size, num_steps, seed=3)
    batches = one_epoch(it)
    for (x0, _), (x1, _) in zip(batches, batches[1:]):
        assert torch.equal(x1[:, 0], x0[:, -1] + 1)
    # the streams are adjacent: row r + 1 starts where row r ends
    stream = len(it) * num_steps
    first = batches[0][0][:, 0]
    assert torch.equal(first, first[0] + stream * torch.arange(batch_size))


def test_sequential_matches_drawing():
    # B = 3, T = 2, 14 tokens -> len = (14 - 2) // 6 = 2 batches per epoch
    it = SequentialBatches(corpus(14), 3, 2, seed=0)
    o = it.epoch_offset(0)
    got = [x.tolist() for x, _ in it]
    rows = [[o + 4 * r + 2 * i, o + 4 * r + 2 * i + 1] for i in range(2) for r in range(3)]
    assert got == [rows[0:3], rows[3:6]]


def test_random_batches_are_shuffled_windows():
    it = RandomBatches(corpus(10_000), 4, 10, seed=0)
    starts = [int(s) for x, _ in it for s in x[:, 0]]
    offset = min(starts)
    assert all((s - offset) % 10 == 0 for s in starts)
    assert starts != sorted(starts)


@pytest.mark.parametrize("cls", ITERATORS)
def test_same_seed_same_batches_different_seed_different(cls):
    def run(seed):
        it = cls(corpus(4000), 4, 9, seed=seed)
        return [x.tolist() for _, (x, _) in zip(range(2 * len(it)), itertools.chain(it, it))]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize("cls", ITERATORS)
@pytest.mark.parametrize("stop_after", [1, 5, 17])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(cls, stop_after):
    tokens = corpus(5000)
    full = cls(tokens, 3, 11, seed=42)
    reference = one_epoch(full) + one_epoch(full)

    first = cls(tokens, 3, 11, seed=42)
    taken = []
    for x, y in first:
        taken.append((x.clone(), y.clone()))
        if len(taken) == stop_after:
            state = first.state_dict()
            break
    assert state == {"epoch": 0, "position": stop_after, "seed": 42, "batch_size": 3,
                     "num_steps": 11, "num_tokens": 5000, "layout": LAYOUT}
    assert all(isinstance(v, int) for v in state.values())

    resumed = cls(tokens, 3, 11, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    rest = one_epoch(resumed)
    assert len(rest) == len(resumed) - stop_after
    assert resumed.epoch == 1 and resumed.position == 0
    rest += one_epoch(resumed)
    got = taken + rest
    assert len(got) == len(reference)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, reference))


@pytest.mark.parametrize("cls", ITERATORS)
def test_state_after_last_batch_continues_with_next_epoch(cls):
    tokens = corpus(800)
    ref = cls(tokens, 2, 5, seed=1)
    epochs = [one_epoch(ref) for _ in range(2)]
    it = cls(tokens, 2, 5, seed=1)
    for _ in it:
        if it.position == len(it):
            break  # stopped holding the last batch: generator not exhausted
    assert (it.epoch, it.position) == (0, len(it))
    resumed = cls(tokens, 2, 5, seed=1)
    resumed.load_state_dict(it.state_dict())
    nxt = one_epoch(resumed)
    assert [x.tolist() for x, _ in nxt] == [x.tolist() for x, _ in epochs[1]]
    assert [x.tolist() for x, _ in it] == [x.tolist() for x, _ in epochs[1]]


@pytest.mark.parametrize("cls", ITERATORS)
def test_load_state_dict_rejects_mismatches(cls):
    it = cls(corpus(1000), 4, 10)
    good = it.state_dict()
    for key, value, message in [
        ("batch_size", 8, "cannot resume: the saved run used batch_size=8 but this one has "
                          "batch_size=4; resume with the same data and batch settings"),
        ("num_steps", 5, "cannot resume: the saved run used num_steps=5 but this one has "
                         "num_steps=10; resume with the same data and batch settings"),
        ("num_tokens", 999, "cannot resume: the saved run used num_tokens=999 but this one has "
                            "num_tokens=1000; resume with the same data and batch settings"),
        ("position", 99, "invalid batch iterator state: epoch 0, position 99 "
                         "(an epoch has 24 batches)"),
    ]:
        with pytest.raises(CharlmError) as err:
            it.load_state_dict({**good, key: value})
        assert str(err.value) == message
    with pytest.raises(CharlmError, match="^invalid batch iterator state: expected integers "):
        it.load_state_dict({"epoch": 0})
    assert it.state_dict() == good


@pytest.mark.parametrize("cls", ITERATORS)
def test_a_state_of_another_batch_order_resumes_at_an_epoch_boundary_only(cls):
    """A checkpoint of an older charlm (no "layout": its offsets and draws differ) resumed
    mid-epoch would repeat or skip windows: refused. At an epoch boundary nothing of the old
    order is left, so it goes on with this one."""
    it = cls(corpus(1000), 4, 10, seed=3)
    assert it.state_dict()["layout"] == LAYOUT == 3
    old = {k: v for k, v in it.state_dict().items() if k != "layout"}
    for state, who in [({**old, "epoch": 2, "position": 5}, "an older"),
                       ({**old, "epoch": 2, "position": 5, "layout": 2}, "an older"),
                       ({**old, "epoch": 2, "position": 5, "layout": 4}, "a newer")]:
        with pytest.raises(CharlmError) as err:
            it.load_state_dict(state)
        assert str(err.value) == (
            "cannot resume: the checkpoint stopped in the middle of epoch 2 (after batch 5 of 24) "
            f"and was written by {who} charlm, whose batch order differs, so the rest of the "
            "epoch would repeat or skip text; start a new run, or resume it with the charlm that "
            "wrote it")
    with pytest.raises(CharlmError) as err:
        it.load_state_dict({**old, "layout": "2"})
    assert str(err.value) == "invalid batch iterator state: layout '2'"
    fresh = cls(corpus(1000), 4, 10, seed=3)
    for _ in range(3):
        want = one_epoch(fresh)  # epochs 0, 1, 2: the last one is what a resume at 2 gives
    for position in (0, 24):  # the start of epoch 2, or the end of epoch 1
        resumed = cls(corpus(1000), 4, 10, seed=3)
        resumed.load_state_dict({**old, "epoch": 2 if position == 0 else 1, "position": position})
        got = one_epoch(resumed)
        assert [x.tolist() for x, _ in got] == [x.tolist() for x, _ in want]
        assert resumed.state_dict()["layout"] == LAYOUT


@pytest.mark.parametrize("cls", ITERATORS)
def test_too_short_corpus_error(cls):
    with pytest.raises(CharlmError) as err:
        cls(corpus(500), 32, 35)
    assert str(err.value) == (
        "corpus too short: 500 tokens make no batch of 32 x 35 (need at least 1155); "
        "use a smaller --batch-size or --num-steps, or a longer text"
    )
    assert err.value.exit_code == 1
    assert len(cls(corpus(1155), 32, 35)) == 1  # the stated minimum is enough
    with pytest.raises(CharlmError, match="^corpus too short: 1154 tokens"):
        cls(corpus(1154), 32, 35)


@pytest.mark.parametrize("cls", ITERATORS)
def test_bad_shape_is_a_usage_error(cls):
    with pytest.raises(UsageError, match=r"^batch size must be >= 1, got 0$"):
        cls(corpus(100), 0, 5)
    with pytest.raises(UsageError, match=r"^num_steps must be >= 1, got -2$"):
        cls(corpus(100), 2, -2)


# --- eval_windows -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 10, 37, 100, 1001])
@pytest.mark.parametrize("batch_size,num_steps", [(1, 1), (1, 7), (2, 5), (3, 4), (8, 35), (64, 3)])
def test_eval_windows_predict_every_target_once_with_context(n, batch_size, num_steps):
    targets = []
    prev_last = None  # last target of each row in the previous window, while the state carries
    windows = list(eval_windows(corpus(n), batch_size, num_steps))
    assert windows[0][2] is True
    for x, y, reset in windows:
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        assert x.shape[1] <= num_steps and x.shape[0] in (batch_size, 1)
        assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(x.shape[1]))
        if not reset:  # state carries over: each row continues its own stream
            assert torch.equal(x[:, 0], prev_last)
        prev_last = y[:, -1]
        targets += y.flatten().tolist()
    assert sorted(targets) == list(range(1, n))


def test_eval_windows_layout():
    # 7 pairs, B = 2, T = 2: streams of 3 pairs plus a remainder stream of 1
    got = [(x.tolist(), y.tolist(), reset) for x, y, reset in eval_windows(corpus(8), 2, 2)]
    assert got == [
        ([[0, 1], [3, 4]], [[1, 2], [4, 5]], True),
        ([[2], [5]], [[3], [6]], False),
        ([[6]], [[7]], True),
    ]


def test_eval_windows_errors():
    with pytest.raises(CharlmError) as err:
        list(eval_windows(corpus(1), 4, 4))
    assert str(err.value) == (
        "corpus too short: 1 tokens leave nothing to evaluate; "
        "use a longer text or a larger validation/test fraction"
    )
    with pytest.raises(UsageError):
        list(eval_windows(corpus(10), 0, 4))


# --- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
@pytest.mark.parametrize("cls", ITERATORS)
def test_batches_on_cuda_equal_cpu_batches(cls):
    cpu = cls(corpus(3000), 4, 13, seed=5)
    gpu = cls(corpus(3000, "cuda"), 4, 13, seed=5)
    for _ in range(2):
        pairs = list(zip(one_epoch(cpu), one_epoch(gpu)))
        assert len(pairs) == len(cpu)
        for (xc, yc), (xg, yg) in pairs:
            assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.int64
            assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    # no host synchronisation anywhere while iterating (epoch changes included)
    it = cls(corpus(3000, "cuda"), 4, 13, seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [b for _, b in zip(range(3 * len(it)), itertools.chain(it, it, it))]
        windows = list(eval_windows(corpus(101, "cuda"), 4, 7))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(batches) == 3 * len(it)
    assert all(x.is_cuda for x, _, _ in windows)
    assert sorted(torch.cat([y.flatten() for _, y, _ in windows]).tolist()) == list(range(1, 101))
