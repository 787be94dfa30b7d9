"""ModelConfig is the one home of the model's defaults and of its list of dropout fields: the
training options, resume's rules and dynamic evaluation take theirs from it."""

from dataclasses import fields

import pytest
import torch

from charlm.config.build import model_config
from charlm.config.train import OPTIONS, TrainConfig, fixed_on_resume
from charlm.inference.dynamic import adaptable
from charlm.errors import CharlmError
from charlm.model.config import ADJUSTABLE, DROPOUTS, ModelConfig
from charlm.model.lm import CharLM


def test_the_dropout_fields_are_every_probability_of_the_model():
    probabilities = {f.name for f in fields(ModelConfig) if f.type == "float"}
    assert set(DROPOUTS) == probabilities == {"dropout", "input_dropout", "embed_dropout",
                                              "weight_drop"}
    assert set(ADJUSTABLE) == {*DROPOUTS, "locked_dropout", "impl"}


def test_stochastic_is_any_dropout_on():
    assert not ModelConfig(vocab_size=5, dropout=0.0).stochastic
    for name in DROPOUTS:
        assert ModelConfig(vocab_size=5, **{**dict.fromkeys(DROPOUTS, 0.0), name: 0.1}).stochastic


def test_resume_fixes_every_model_option_but_the_adjustable_ones():
    model_options = {f.name for f in fields(ModelConfig)} & set(OPTIONS)
    assert model_options - set(fixed_on_resume()) == set(ADJUSTABLE)
    assert model_options & set(fixed_on_resume()) == model_options - set(ADJUSTABLE)


def test_dynamic_evaluation_turns_every_dropout_off():
    on = ModelConfig(vocab_size=7, hidden=8, embed=4, dropout=0.5, input_dropout=0.1,
                     embed_dropout=0.2, weight_drop=0.3, locked_dropout=True)
    copy = adaptable(CharLM(on))
    assert {name: getattr(copy.config, name) for name in DROPOUTS} == dict.fromkeys(DROPOUTS, 0.0)
    assert not copy.config.stochastic and copy.training


def test_a_default_model_config_is_the_model_charlm_train_builds():
    trained = model_config(TrainConfig(), vocab_size=28, impl="fused")
    assert trained == ModelConfig(vocab_size=28)
    assert (ModelConfig(vocab_size=28).layers, ModelConfig(vocab_size=28).embed,
            ModelConfig(vocab_size=28).dropout) == (2, 32, 0.2)
    for f in fields(ModelConfig):
        if f.name in OPTIONS and f.name != "impl":  # train's impl may be auto
            assert getattr(TrainConfig(), f.name) == f.default, f.name
    torch.manual_seed(0)
    a = CharLM(ModelConfig(vocab_size=28)).state_dict()
    torch.manual_seed(0)
    b = CharLM(trained).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoints_model_config_must_name_every_key():
    """A missing key would load with today's default, another model than the one trained."""
    saved = ModelConfig(vocab_size=9, layers=1, embed=0, dropout=0.0).to_dict()
    assert ModelConfig.from_dict(saved) == ModelConfig(**saved)
    del saved["layers"], saved["tie_weights"]
    with pytest.raises(CharlmError) as err:
        ModelConfig.from_dict(saved)
    assert str(err.value) == ("checkpoint's model config lacks ['layers', 'tie_weights']; the "
                              "file is damaged")
