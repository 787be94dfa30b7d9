"""A checkpoint's validation reads each tensor's values once per load: `check_fields` scans them
as the file is loaded, and the checks where weights are loaded (`check_parameters`, for the
model and for its averaged weights) read none of them again."""

from collections import Counter

import torch
from helpers import train_runs

from charlm.artifacts.fields import check_parameters, largest_value, values_passed
from charlm.inference.loading import load_model
from charlm.model.config import ModelConfig
from charlm.model.lm import CharLM


def test_loading_a_checkpoint_reads_each_tensors_values_once(tmp_path, monkeypatch):
    run = train_runs(tmp_path, {"run": ["--ema", "0.9"]})["run"]
    scans, real = Counter(), torch.isfinite

    def counted(tensor, *args, **kwargs):
        scans[id(tensor)] += 1
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "isfinite", counted)
    for weights in ("raw", "ema"):
        scans.clear()
        loaded = load_model(run / "last.pt", None, "cpu", weights=weights)
        ckpt = loaded.ckpt
        tensors = [*ckpt["model"].values(), *ckpt["ema"]["model"].values()]
        assert {id(t): scans[id(t)] for t in tensors} == {id(t): 1 for t in tensors}
        assert max(scans.values()) == 1


def test_a_tensor_no_check_has_passed_is_scanned_where_it_is_loaded():
    model = CharLM(ModelConfig(vocab_size=5, hidden=4, layers=1, embed=0, dropout=0.0))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(values_passed(t) for t in saved.values())
    check_parameters("x.pt", model, saved)
    assert all(values_passed(t) for t in saved.values())
    bad = torch.full((2,), float("nan"))
    assert largest_value(bad) == float("inf") and not values_passed(bad)
    assert largest_value(torch.tensor([2e6])) == 2e6
