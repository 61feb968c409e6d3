"""The hand-derived gradients of the compiled step, checked against torch autograd."""

import numpy as np
import pytest
import torch

from rnnlm.model import RNNLM, Config, OnlineRule, StreamState, Weights
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


def test_the_dense_layers_learn_at_their_own_rate_and_the_word_rows_at_the_rate():
    """OnlineRule.dense_rate (training's --dense-rate) scales the steps of W and X only."""
    model = small_model()
    before = model.weights.copy()
    lr, dense_rate = 0.3, 0.25
    targets = np.array([model.vocab.index["c"]], dtype=np.int32)
    model.step(targets, model.new_state(), OnlineRule(lr=lr, bptt=0, dense_rate=dense_rate))

    w = as_torch(before)
    s1 = torch.sigmoid(w["U"][model.vocab.eos_id] + w["W"] @ torch.full((6,), 0.1, dtype=torch.float64))
    reference_logprob(w, s1, int(targets[0]), model.vocab).backward()
    for name, array in model.weights.arrays().items():
        rate = lr * dense_rate if name in ("W", "X") else lr
        want = w[name].detach().numpy() + rate * w[name].grad.numpy()
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


# Direct connections (RNNME): hashed n-gram features of the last 0..order-1 words on the outputs.

MASK64 = (1 << 64) - 1


def splitmix_finaliser(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def python_history_hash(recent_first: list[int]) -> int:
    """The hash the model files depend on, written again in plain Python integers."""
    h = splitmix_finaliser(len(recent_first) + 1)
    for word in recent_first:
        h = splitmix_finaliser(h ^ (word + 1))
    return h


def test_history_hash_is_the_documented_function_and_depends_on_order_and_words():
    from rnnlm import kernels
    inputs = np.array([4, 11, 5, 7, 9], dtype=np.int32)  # 9 is the most recent word
    K = len(inputs) - 1
    hashes = [int(kernels.history_hash(inputs, K, n)) for n in range(5)]
    assert hashes == [python_history_hash([9, 7, 5, 11, 4][:n]) for n in range(5)]
    assert hashes[3] == 0x4824A799D41CC923  # pinned: a change of hash would silently scramble saved models
    assert len(set(hashes)) == 5
    swapped = np.array([4, 11, 5, 9, 7], dtype=np.int32)
    assert int(kernels.history_hash(swapped, K, 2)) != hashes[2]
    assert int(kernels.history_hash(swapped, K, 1)) != hashes[1]
    assert int(kernels.history_hash(inputs, K, 2)) == hashes[2]  # same history, same hash


def direct_model(order=3, seed=3):
    vocab = Vocabulary.build(WORDS, min_count=1, num_classes=3)
    model = RNNLM.create(Config(hidden=6, classes=3, seed=seed, init_std=0.5, direct=0.004, direct_order=order,
                                direct_rate=1.7), vocab)
    rng = np.random.default_rng(seed)
    model.weights.D[:] = rng.normal(scale=0.5, size=model.weights.D.shape).astype(np.float32)
    return model


def feature_indices(model, history: list[int], target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into D of the class features (order × classes) and of the target class's word features."""
    from rnnlm import kernels
    v, cfg = model.vocab, model.config
    inputs = np.array(history, dtype=np.int32)
    K = len(inputs) - 1
    c = int(v.class_of[target])
    span = int(np.max(v.class_end - v.class_start))
    cb = np.zeros(cfg.direct_order, dtype=np.int64)
    wb = np.zeros(cfg.direct_order, dtype=np.int64)
    kernels.direct_bases(cfg.direct_size, cfg.direct_order, inputs, K, c, v.num_classes, span, cb, wb)
    size = int(v.class_end[c] - v.class_start[c])
    return (torch.tensor(cb[:, None] + np.arange(v.num_classes)), torch.tensor(wb[:, None] + np.arange(size)))


def reference_direct_logprob(w: dict, D: torch.Tensor, s, target: int, vocab, class_idx, word_idx):
    c = int(vocab.class_of[target])
    lo, hi = int(vocab.class_start[c]), int(vocab.class_end[c])
    z_class = w["X"] @ s + D[class_idx].sum(0)
    z_word = w["V"][lo:hi] @ s + D[word_idx].sum(0)
    return torch.log_softmax(z_class, 0)[c] + torch.log_softmax(z_word, 0)[target - lo]


def test_direct_features_step_matches_autograd_through_a_block():
    """Order 3, three words in one BPTT block: D moves after each word (own rate and L2), as V and X do."""
    model = direct_model()
    before = model.weights.copy()
    lr, d_l2 = 0.2, 0.05
    d_lr = lr * model.config.direct_rate
    rule = OnlineRule(lr=lr, direct_l2=d_l2, bptt=2, block=3)
    state = model.new_state(rule)
    eos = model.vocab.eos_id
    ids = np.array([model.vocab.index[t] for t in ("b", "a", "d")], dtype=np.int32)
    logp = model.step(ids, state, rule)[0]

    w = as_torch(before)
    out = {n: w[n].detach().clone() for n in ("V", "X", "D")}
    s = torch.full((6,), 0.1, dtype=torch.float64)
    history = [eos, eos, eos]  # a fresh stream starts after a sentence end
    total = 0.0
    for t, target in enumerate(ids):
        s = torch.sigmoid(w["U"][history[-1]] + w["W"] @ s)
        class_idx, word_idx = feature_indices(model, history, int(target))
        touched = torch.cat([class_idx.flatten(), word_idx.flatten()])
        assert len(set(touched.tolist())) == len(touched), "choose a seed whose features do not collide"
        snapshot = {n: out[n].clone().requires_grad_(True) for n in out}
        lp = reference_direct_logprob(snapshot, snapshot["D"], s, int(target), model.vocab, class_idx, word_idx)
        assert logp[t] == pytest.approx(lp.item(), abs=1e-5)
        grads = dict(zip(out, torch.autograd.grad(lp, [snapshot[n] for n in out], retain_graph=True)))
        out["V"] += lr * grads["V"]
        out["X"] += lr * grads["X"]
        decay = torch.zeros_like(out["D"])
        decay[touched] = out["D"][touched]
        out["D"] += d_lr * (grads["D"] - d_l2 * decay)
        total = total + lp
        history = history[1:] + [int(target)]
    total.backward()

    for name in ("V", "X", "D"):
        np.testing.assert_allclose(getattr(model.weights, name), out[name].numpy(), atol=2e-6, err_msg=name)
    for name in ("W", "U"):
        want = w[name].detach().numpy() + lr * w[name].grad.numpy()
        np.testing.assert_allclose(getattr(model.weights, name), want, atol=2e-6, err_msg=name)


def test_direct_history_outlives_the_backprop_window_and_pieces_match_the_whole():
    """Order 5 needs 4 words of history, more than the τ=1 rule's window: the stream keeps them."""
    model = direct_model(order=5)
    rule = OnlineRule(lr=0.1, bptt=0, block=1)
    assert model.new_state(rule).window >= 4
    ids, _ = model.vocab.encode(WORDS * 3)
    whole_model, piece_model = direct_model(order=5), direct_model(order=5)
    whole = whole_model.step(ids, whole_model.new_state(rule), rule)[0]
    state = piece_model.new_state(rule)
    pieces = np.concatenate([piece_model.step(ids[i:i + 5], state, rule)[0] for i in range(0, len(ids), 5)])
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_array_equal(whole_model.weights.D, piece_model.weights.D)
    with pytest.raises(ValueError, match="window|holds"):
        model.step(ids, StreamState(6, model.vocab.eos_id, window=1), rule)


def test_silent_direct_weights_score_exactly_as_the_plain_network():
    plain = small_model()
    vocab = plain.vocab
    direct = RNNLM(Config(hidden=6, classes=3, direct=0.002, direct_order=4), vocab,
                   Weights(**plain.weights.arrays(), D=np.zeros(2000, dtype=np.float32)))
    ids, _ = vocab.encode(WORDS * 2)
    static = OnlineRule(learn=False)
    np.testing.assert_array_equal(plain.step(ids, plain.new_state(), static)[0],
                                  direct.step(ids, direct.new_state(), static)[0])


def test_an_online_rule_may_set_the_direct_weights_rate_apart_from_the_model():
    from dataclasses import replace
    ids = np.array([1, 0, 3, 2, 8], dtype=np.int32)
    by_rule, by_config = direct_model(), direct_model()
    by_config.config = replace(by_config.config, direct_rate=4.0)
    rule = OnlineRule(lr=0.1, direct_rate=4.0)
    a = by_rule.step(ids, by_rule.new_state(rule), rule)[0]
    b = by_config.step(ids, by_config.new_state(rule), OnlineRule(lr=0.1))[0]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(by_rule.weights.D, by_config.weights.D)
    default = direct_model()
    default.step(ids, default.new_state(rule), OnlineRule(lr=0.1))
    assert not np.array_equal(default.weights.D, by_rule.weights.D)


def test_weights_whose_direct_array_is_not_the_models_are_refused_before_the_step():
    model = direct_model()
    ids = np.array([1, 0], dtype=np.int32)
    for wrong in (np.zeros(0, np.float32), np.zeros(10, np.float32)):
        weights = Weights(**{n: getattr(model.weights, n) for n in Weights.NAMES}, D=wrong)
        with pytest.raises(ValueError, match="direct weights hold"):
            model.step(ids, model.new_state(), OnlineRule(), weights)
