"""The benchmark scripts' own arithmetic (their measurements live in docs/BENCHMARKS.md)."""

import importlib.util
from pathlib import Path

import pytest
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    import sys

    sys.path.insert(0, str(SCRIPTS))  # the scripts import their neighbour benchlib
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("config", ["seeds", "default"])
def test_roofline_counts_six_flops_per_learned_weight(config):
    """bench_baselines' ceiling: 6 FLOPs per character for every weight a training step
    multiplies (forward, weight gradient, input gradient), except the first layer's product on a
    one-hot input (a row lookup, nothing upstream learns), counted from the bare model itself."""
    bench = load_script("bench_baselines")
    m, vocab = bench.MODELS[config], 28
    rnn = nn.GRU(m["embed"] or vocab, m["hidden"], m["layers"])
    head = nn.Linear(m["hidden"], vocab)
    weights = [p for name, p in rnn.named_parameters() if name.startswith("weight")
               and not (name == "weight_ih_l0" and not m["embed"])]
    expected = 6 * (sum(p.numel() for p in weights) + head.weight.numel())
    assert bench.train_flops_per_token(m, vocab) == expected
    assert expected == {"seeds": 1_222_656, "default": 3_729_408}[config]


def test_ablation_table_groups_runs_of_arms_defined_on_the_command_line():
    """ablation.py --table: rows in ROWS' order, the built-in arms first in ARMS' order, arms of
    --arm after them in order of first appearance, each with its runs' mean and spread."""
    ablation = load_script("ablation")

    def run(row, arm, seed, nats):
        return {"row": row, "arm": arm, "options": f"--{arm}", "seed": seed,
                "nats_per_char": nats, "perplexity": 2.0 ** nats, "tokens_per_s": 1000.0}

    entries = [run("timemachine", "wide", 0, 1.5), run("shakespeare", "base", 0, 1.4),
               run("timemachine", "deep", 0, 1.3), run("timemachine", "base", 0, 1.2),
               run("timemachine", "wide", 1, 1.7)]
    got = ablation.grouped(entries)
    assert [(g["row"], g["arm"]) for g in got] == [
        ("shakespeare", "base"), ("timemachine", "base"), ("timemachine", "wide"),
        ("timemachine", "deep")]
    wide = got[2]
    assert wide["seeds"] == [0, 1] and wide["finished"] == 2
    assert wide["nats_per_char"] == pytest.approx(1.6)
    assert wide["nats_per_char_sd"] == pytest.approx(0.1414213562, rel=1e-6)


def test_ablation_arms_can_start_from_another_config_of_a_row():
    """--config ROW=FILE: the base of ROW's arms (a row's shipped config can change, as The Time
    Machine's did with issue 28); a row that is not a CPU row is refused."""
    ablation = load_script("ablation")
    args = ablation.parse_args(["--rows", "timemachine", "--arms", "base",
                                "--config", "timemachine=configs/timemachine-gru.toml"])
    assert args.configs == {"timemachine": "configs/timemachine-gru.toml"}
    assert ablation.parse_args(["--rows", "timemachine", "--arms", "base"]).configs == {}
    with pytest.raises(SystemExit):
        ablation.parse_args(["--config", "shakespeare-gpu=configs/shakespeare-lstm.toml"])
