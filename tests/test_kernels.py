"""The hand-derived gradients of the compiled step, checked against torch autograd."""

import numpy as np
import pytest
import torch

from rnnlm.model import RNNLM, Config, OnlineRule, Weights
from rnnlm.vocab import Vocabulary

WORDS = "a a a a a b b b b c c c d d e f g h </s>".split()


def small_model(hidden=6, classes=3, seed=3):
    vocab = Vocabulary.build(WORDS, min_count=1, num_classes=classes)
    model = RNNLM.create(Config(hidden=hidden, classes=classes, seed=seed, init_std=0.5), vocab)
    return model


def reference_logprob(w: dict, s: torch.Tensor, target: int, vocab: Vocabulary) -> torch.Tensor:
    """ln P(target | s) = ln softmax(X s)[c] + ln softmax(V[class rows] s)[target]"""
    c = int(vocab.class_of[target])
    lo, hi = int(vocab.class_start[c]), int(vocab.class_end[c])
    return torch.log_softmax(w["X"] @ s, 0)[c] + torch.log_softmax(w["V"][lo:hi] @ s, 0)[target - lo]


def as_torch(weights: Weights) -> dict:
    return {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in weights.arrays().items()}


def test_plain_backprop_step_matches_autograd():
    model = small_model()
    before = model.weights.copy()
    lr = 0.3
    state = model.new_state()
    targets = np.array([model.vocab.index["c"]], dtype=np.int32)
    logp = model.step(targets, state, OnlineRule(lr=lr, bptt=0))[0]

    w = as_torch(before)
    s0 = torch.full((6,), 0.1, dtype=torch.float64)
    s1 = torch.sigmoid(w["U"][model.vocab.eos_id] + w["W"] @ s0)
    expected = reference_logprob(w, s1, int(targets[0]), model.vocab)
    expected.backward()

    assert logp[0] == pytest.approx(expected.item(), abs=1e-5)
    for name, array in model.weights.arrays().items():
        want = w[name].detach().numpy() + lr * w[name].grad.numpy()
        np.testing.assert_allclose(array, want, atol=2e-6, err_msg=name)


def test_truncated_bptt_block_matches_autograd():
    """Three words, one block: output weights step after each word; W and U once, through all three."""
    model = small_model()
    before = model.weights.copy()
    lr = 0.2
    rule = OnlineRule(lr=lr, bptt=2, block=3)
    state = model.new_state(rule)
    ids = np.array([model.vocab.index[t] for t in ("b", "a", "d")], dtype=np.int32)
    logp = model.step(ids, state, rule)[0]

    w = as_torch(before)
    out = {n: w[n].detach().clone() for n in ("V", "X")}  # output weights move word by word
    s = torch.full((6,), 0.1, dtype=torch.float64)
    previous = model.vocab.eos_id
    total = 0.0
    for t, target in enumerate(ids):
        s = torch.sigmoid(w["U"][previous] + w["W"] @ s)
        snapshot = {n: out[n].clone().requires_grad_(True) for n in out}
        lp = reference_logprob(snapshot, s, int(target), model.vocab)
        assert logp[t] == pytest.approx(lp.item(), abs=1e-5)
        grads = torch.autograd.grad(lp, [snapshot["V"], snapshot["X"]], retain_graph=True)
        out["V"] += lr * grads[0]
        out["X"] += lr * grads[1]
        total = total + lp
        previous = int(target)
    total.backward()

    np.testing.assert_allclose(model.weights.V, out["V"].numpy(), atol=2e-6)
    np.testing.assert_allclose(model.weights.X, out["X"].numpy(), atol=2e-6)
    for name in ("W", "U"):
        want = w[name].detach().numpy() + lr * w[name].grad.numpy()
        np.testing.assert_allclose(getattr(model.weights, name), want, atol=2e-6, err_msg=name)


def test_static_step_changes_nothing_and_feeding_in_pieces_is_the_same():
    model = small_model()
    before = model.weights.copy()
    ids, _ = model.vocab.encode(WORDS * 3)
    rule = OnlineRule(learn=False)
    whole = model.step(ids, model.new_state(), rule)[0]
    state = model.new_state()
    pieces = np.concatenate([model.step(ids[i:i + 7], state, rule)[0] for i in range(0, len(ids), 7)])
    np.testing.assert_array_equal(whole, pieces)
    for name, array in model.weights.arrays().items():
        np.testing.assert_array_equal(array, getattr(before, name))


def test_full_softmax_is_one_class():
    model = small_model(classes=1)
    assert model.vocab.num_classes == 1
    ids, _ = model.vocab.encode(WORDS)
    w = as_torch(model.weights)
    logp = model.step(ids[:1], model.new_state(), OnlineRule(learn=False))[0]
    s = torch.sigmoid(w["U"][model.vocab.eos_id] + w["W"] @ torch.full((6,), 0.1, dtype=torch.float64))
    assert logp[0] == pytest.approx(torch.log_softmax(w["V"] @ s, 0)[ids[0]].item(), abs=1e-5)
