"""A daemon domain's direct weights as copy-on-write blocks of the base's D (rnnlm/direct.py): it
scores and learns exactly as a full copy would, never writes the base, costs the blocks it wrote,
and survives copy, assign, decay and a checkpoint round trip."""

import numpy as np
import pytest
import torch

from rnnlm import direct
from rnnlm.checkpoint import CheckpointError, weights_from_tensors, weights_to_tensors
from rnnlm.direct import BLOCK, DirectBlocks
from rnnlm.model import RNNLM, Config, OnlineRule
from rnnlm.vocab import Vocabulary
from tests.test_model import toy_text, words_of


def rnnme(direct_millions: float, order: int = 4) -> RNNLM:
    words = words_of(toy_text(200, seed=4))
    model = RNNLM.create(Config(hidden=8, classes=4, direct=direct_millions, direct_order=order, seed=5),
                         Vocabulary.build(words, 1, 4))
    rng = np.random.default_rng(6)
    model.weights.D[:] = rng.normal(scale=0.3, size=model.weights.D.shape).astype(np.float32)
    return model


def effective_d(weights) -> np.ndarray:
    """The D a domain's copy stands for: the base's, with its own blocks laid over it."""
    full = weights.D.copy()
    for b in np.flatnonzero(weights.D_own.table >= 0):
        lo = b * BLOCK
        hi = min(lo + BLOCK, full.size)
        full[lo:hi] = weights.D_own.pool[weights.D_own.table[b], : hi - lo]
    return full


def stream(model, weights, words, rule):
    ids, _ = model.vocab.encode(words)
    state = model.new_state(rule)
    return np.concatenate([model.step(ids[i:i + 37], state, rule, weights)[0] for i in range(0, len(ids), 37)])


# 4,000 weights: a short last block and colliding features; 200,000: many blocks, few of them touched
@pytest.mark.parametrize("millions", [0.004, 0.2])
def test_a_domain_copy_learns_exactly_as_a_full_copy_and_never_writes_the_base(millions):
    model = rnnme(millions)
    base_d = model.weights.D.copy()
    full, blocks = model.weights.copy(), model.weights.adapted_copy()
    assert full.D_own is None and blocks.D_own is not None and blocks.D is model.weights.D
    words = words_of(toy_text(60, seed=9))
    rule = OnlineRule(lr=0.05, direct_l2=1e-3, bptt=2, block=3)
    np.testing.assert_array_equal(stream(model, blocks, words, rule), stream(model, full, words, rule))
    np.testing.assert_array_equal(model.weights.D, base_d)
    np.testing.assert_array_equal(effective_d(blocks), full.D)
    for name in ("U", "W", "V", "X"):
        np.testing.assert_array_equal(getattr(blocks, name), getattr(full, name))
    frozen = OnlineRule(learn=False)
    np.testing.assert_array_equal(stream(model, blocks, words, frozen), stream(model, full, words, frozen))


def test_a_domain_costs_the_blocks_it_wrote_not_the_whole_hash():
    model = rnnme(4.0, order=3)  # 4 M weights: 16 MB for a full copy
    weights = model.weights.adapted_copy()
    assert weights.D_own.nbytes == 4 * direct.block_count(model.config.direct_size)  # the table alone
    words = words_of(toy_text(100, seed=1))
    stream(model, weights, words, OnlineRule())
    per_word = direct.blocks_per_word(3, model.vocab.num_classes, int(np.max(model.vocab.class_end - model.vocab.class_start)))
    assert 0 < weights.D_own.count <= per_word * len(words)
    changed = np.flatnonzero((effective_d(weights) != model.weights.D).reshape(-1, BLOCK).any(axis=1))
    assert changed.size == weights.D_own.count  # each copied block was written
    assert weights.D_own.nbytes < model.weights.D.nbytes / 10
    assert weights.D_own.pool.shape[0] <= 2 * weights.D_own.count + per_word * direct.MAX_WORDS_PER_CALL


def test_copy_assign_and_decay_act_on_the_domains_blocks():
    model = rnnme(0.2)
    a = model.weights.adapted_copy()
    words = words_of(toy_text(30, seed=2))
    stream(model, a, words, OnlineRule())
    snapshot = a.copy()
    assert snapshot.D is model.weights.D and snapshot.D_own is not a.D_own
    stream(model, a, words, OnlineRule())
    assert not np.array_equal(effective_d(a), effective_d(snapshot))
    a.assign(snapshot)
    np.testing.assert_array_equal(effective_d(a), effective_d(snapshot))
    keep, lam = np.float32(0.9), np.float32(0.1)
    want = keep * effective_d(a) + lam * model.weights.D
    a.D_own.decay(keep, model.weights.D * lam)
    np.testing.assert_allclose(effective_d(a), want, rtol=1e-6)
    a.assign(model.weights)  # back to the base model: nothing of its own left
    assert a.D_own.count == 0 and (a.D_own.table == direct.OWN_NOTHING).all()
    np.testing.assert_array_equal(effective_d(a), model.weights.D)


def restore(model, tensors):
    cfg, v = model.config, model.vocab
    return weights_from_tensors(tensors, len(v), cfg.hidden, v.num_classes, "state", cfg.direct_size, model.weights)


def test_a_domains_blocks_round_trip_through_a_checkpoint_and_damage_is_refused():
    model = rnnme(0.2)
    a = model.weights.adapted_copy()
    stream(model, a, words_of(toy_text(30, seed=3)), OnlineRule())
    tensors = weights_to_tensors(a, copy=True)
    assert set(tensors) == {"U", "W", "V", "X", "D_table", "D_blocks"}
    back = restore(model, tensors)
    assert back.D is model.weights.D
    np.testing.assert_array_equal(effective_d(back), effective_d(a))
    # a state written when every domain held a full copy of D resumes as blocks
    network = {n: tensors[n] for n in ("U", "W", "V", "X")}
    old = restore(model, {**network, "D": torch.from_numpy(effective_d(a))})
    np.testing.assert_array_equal(effective_d(old), effective_d(a))
    assert old.D_own.count <= a.D_own.count
    for damage in ("duplicate", "out of range", "shape", "nan"):
        bad = dict(tensors)
        table, blocks = tensors["D_table"].clone(), tensors["D_blocks"].clone()
        owned = np.flatnonzero(table.numpy() >= 0)
        if damage == "duplicate":
            table[owned[1]] = table[owned[0]]
        elif damage == "out of range":
            table[owned[0]] = blocks.shape[0] + 3
        elif damage == "shape":
            table = table[:-1]
        else:
            blocks[0, 0] = float("nan")
        bad["D_table"], bad["D_blocks"] = table, blocks
        with pytest.raises(CheckpointError):
            restore(model, bad)
