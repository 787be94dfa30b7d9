"""The h-or-(h, c) state helpers: one module, both forms."""

import torch

from charlm.model.state import (cat_states, detach_state, from_layers, from_plain, layers_of,
                                map_state, tensors, to_plain)


def test_each_helper_keeps_the_form_it_was_given():
    h = torch.arange(24.0).reshape(2, 3, 4)
    c = -h
    assert map_state(lambda s: s + 1, None) is None
    assert torch.equal(map_state(lambda s: s + 1, h), h + 1)
    pair = map_state(lambda s: s[:, :1], (h, c))
    assert isinstance(pair, tuple) and torch.equal(pair[0], h[:, :1]) and torch.equal(pair[1], c[:, :1])
    assert torch.equal(cat_states([h[:, :1], h[:, 1:]], 1), h)
    assert [torch.equal(a, b) for a, b in zip(cat_states([[h[:, :1], c[:, :1]], [h[:, 1:], c[:, 1:]]], 1), [h, c])] == [True, True]
    assert len(tensors(h)) == 1 and len(tensors((h, c))) == 2
    assert torch.equal(from_layers(layers_of(h)), h)
    back = from_layers(layers_of((h, c)))
    assert torch.equal(back[0], h) and torch.equal(back[1], c)
    assert torch.equal(layers_of((h, c))[1][1], c[1])


def test_a_checkpoint_keeps_the_pair_as_a_float32_list():
    h = torch.ones(1, 2, 3, dtype=torch.bfloat16, requires_grad=True)
    plain = to_plain((h, h * 2))
    assert isinstance(plain, list) and [p.dtype for p in plain] == [torch.float32] * 2
    assert not plain[0].requires_grad and to_plain(None) is None
    state = from_plain(plain, "cpu")
    assert isinstance(state, tuple) and torch.equal(state[1], torch.full((1, 2, 3), 2.0))
    assert from_plain(h.detach().half(), "cpu").dtype == torch.float32
    assert not detach_state((h, h))[0].requires_grad
