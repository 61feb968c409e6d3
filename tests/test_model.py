"""Vocabulary (eq. 7), training schedule, dynamic evaluation and checkpoints on small made-up text."""

import math
import pickle

import numpy as np
import pytest
import torch

from rnnlm.checkpoint import CheckpointError, load_model, save_model
from rnnlm.evaluate import evaluate
from rnnlm.model import RNNLM, Config, OnlineRule, Weights
from rnnlm.train import DENSE, merge_dense_updates, train
from rnnlm.vocab import KNOWN, OOV, RARE, RARE_WORD, Vocabulary


def toy_text(sentences=200, seed=0):
    """A tiny grammar: subject verb object, with a few rare names."""
    rng = np.random.default_rng(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my friend"], ["sees", "likes", "eats"], ["fish", "bread", "the ball"]
    rare = ["zorro", "quill", "xavi"]
    lines = []
    for i in range(sentences):
        subject = rare[i % 3] if i % 50 == 0 else subjects[rng.integers(3)]
        lines.append(f"{subject} {verbs[rng.integers(3)]} {objects[rng.integers(3)]}")
    return lines


def words_of(lines):
    return [w for line in lines for w in line.split() + ["</s>"]]


def test_rare_words_share_the_rare_token_and_probabilities_sum_to_one():
    words = words_of(toy_text())
    vocab = Vocabulary.build(words, min_count=3, num_classes=4)
    assert vocab.rare_words == {"zorro", "quill", "xavi"}
    assert RARE in vocab.index and "zorro" not in vocab.index
    model = RNNLM.create(Config(hidden=8, classes=4, min_count=3), vocab)

    # Every word the model can name: the kept words (not the rare token itself) and each rare word.
    candidates = [w for w in vocab.words if w != RARE] + sorted(vocab.rare_words)
    state = model.new_state()
    model.score_words("the cat".split(), state, OnlineRule(learn=False))
    total = 0.0
    for word in candidates:
        logp, _, _ = model.score_words([word], state.copy(), OnlineRule(learn=False))
        total += math.exp(logp[0])
    assert total == pytest.approx(1.0, abs=1e-5)

    _, kinds = vocab.encode(["cat", "zorro", "never-seen"])
    assert list(kinds) == [KNOWN, RARE_WORD, OOV]
    logp, _, _ = model.score_words(["zorro"], state.copy(), OnlineRule(learn=False))
    logp_rare_token = model.step(np.array([vocab.rare_id], np.int32), state.copy(), OnlineRule(learn=False))[0]
    assert logp[0] == pytest.approx(logp_rare_token[0] - math.log(3), abs=1e-9)


def test_oov_maps_to_unk_when_the_text_has_one():
    vocab = Vocabulary.build("a b <unk> a </s>".split())
    ids, kinds = vocab.encode(["qqq"])
    assert ids[0] == vocab.unk_id and kinds[0] == OOV
    assert vocab.word_logprob_offset(kinds)[0] == 0.0


def test_classes_are_contiguous_and_follow_frequency():
    words = words_of(toy_text(400))
    vocab = Vocabulary.build(words, num_classes=5)
    assert list(vocab.counts) == sorted(vocab.counts, reverse=True)
    assert np.all(np.diff(vocab.class_of) >= 0)
    assert vocab.class_start[0] == 0 and vocab.class_end[-1] == len(vocab)
    # frequent words sit in smaller classes than rare ones
    sizes = vocab.class_end - vocab.class_start
    assert sizes[0] < sizes[-1]


def test_sqrt_classes_split_rare_words_finer_and_old_files_keep_frequency_classes():
    words = words_of(toy_text(400))
    sqrt, frequency = Vocabulary.build(words, num_classes=5, class_rule="sqrt"), Vocabulary.build(words, num_classes=5)
    assert frequency.class_rule == "frequency"
    last = lambda v: v.class_end[-1] - v.class_start[-1]
    assert last(sqrt) < last(frequency), "sqrt mass gives the rare words' class fewer members"
    state = sqrt.to_state()
    assert Vocabulary.from_state(state).class_of.tolist() == sqrt.class_of.tolist()
    del state["class_rule"]  # a file from before class rules existed
    assert Vocabulary.from_state(state).class_of.tolist() == frequency.class_of.tolist()


def test_learning_rate_schedule_halves_then_stops_and_never_keeps_worse_weights():
    lines = toy_text(300)
    words, valid = words_of(lines[:250]), words_of(lines[250:])
    vocab = Vocabulary.build(words, num_classes=3)
    config = Config(hidden=10, classes=3, lr=0.1, max_epochs=40, min_improvement=1.003, bptt=2, bptt_block=5)
    model = RNNLM.create(config, vocab)
    report = train(model, words, valid)
    rates = [e.lr for e in report.epochs]
    first_halved = next(i for i, r in enumerate(rates) if r < 0.1)
    assert all(r == 0.1 for r in rates[:first_halved])
    # from the first halving on, α halves every epoch
    assert all(rates[i + 1] == pytest.approx(rates[i] / 2) for i in range(first_halved, len(rates) - 1))
    assert len(report.epochs) < 40, "training must stop on its own"
    # the final weights score validation exactly as the best kept epoch did
    final = evaluate(model, valid)
    assert final.loss_nats == pytest.approx(report.best_valid.loss_nats, rel=1e-9)
    assert final.perplexity < len(vocab) / 2


def test_merging_the_threads_dense_updates_averages_their_copies_and_hands_back_the_mean():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(5, 3)).astype(np.float32)  # U and V are shared, not merged
    replicas = [Weights(U=shared, V=shared, W=rng.normal(size=(4, 4)).astype(np.float32),
                        X=rng.normal(size=(2, 4)).astype(np.float32)) for _ in range(3)]
    want = {n: sum(getattr(r, n) for r in replicas) / 3 for n in DENSE}
    merge_dense_updates(replicas)
    for name in DENSE:
        for r in replicas:
            np.testing.assert_allclose(getattr(r, name), want[name], rtol=1e-5, atol=1e-6)
    assert replicas[0].U is shared and replicas[2].V is shared


def test_two_threads_learn_as_well_as_one():
    """Each thread trains on its half of the text; every update reaches the model's weights."""
    lines = toy_text(400, seed=3)
    words, valid = words_of(lines[:340]), words_of(lines[340:])
    vocab = Vocabulary.build(words, num_classes=3)
    results = {}
    for threads in (1, 2):
        model = RNNLM.create(Config(hidden=12, classes=3, max_epochs=4), vocab)
        start = model.weights.copy()
        report = train(model, words, valid, threads=threads)
        assert sum(e.train.words for e in report.epochs) == len(report.epochs) * len(words)
        for name in model.weights.NAMES:
            assert not np.array_equal(getattr(model.weights, name), getattr(start, name)), (threads, name)
        results[threads] = evaluate(model, valid).perplexity
    assert results[2] < len(vocab) / 2
    assert results[2] < 1.1 * results[1], results


def test_dynamic_evaluation_adapts_and_beats_static_on_a_repetitive_stream():
    lines = toy_text(300)
    words = words_of(lines)
    vocab = Vocabulary.build(words, num_classes=3)
    model = RNNLM.create(Config(hidden=10, classes=3, max_epochs=3), vocab)
    train(model, words[:600], words[600:900])
    repetitive = words_of(["the ball eats the cat"] * 60)
    static = evaluate(model, repetitive)
    adapted = model.weights.copy()
    dynamic = evaluate(model, repetitive, OnlineRule(lr=0.1), weights=adapted)
    assert dynamic.perplexity < 0.8 * static.perplexity
    assert not np.array_equal(adapted.V, model.weights.V)
    assert static.words == dynamic.words == len(repetitive)


def test_checkpoint_round_trip(tmp_path):
    words = words_of(toy_text())
    model = RNNLM.create(Config(hidden=7, classes=3, min_count=2), Vocabulary.build(words, 2, 3))
    path = tmp_path / "m.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.vocab.words == model.vocab.words and loaded.vocab.rare_words == model.vocab.rare_words
    assert loaded.config == model.config
    for name, array in model.weights.arrays().items():
        np.testing.assert_array_equal(getattr(loaded.weights, name), array)
    a = evaluate(model, words).loss_nats
    b = evaluate(loaded, words).loss_nats
    assert a == b
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"], "no temporary files left behind"


class Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", ["truncated", "foreign", "pickle", "garbage"])
def test_bad_checkpoints_are_refused(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        model = RNNLM.create(Config(hidden=4, classes=2), Vocabulary.build("a b c </s>".split(), 1, 2))
        save_model(model, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"format": "rnnlm-model", "x": Boom()}))
    else:
        path.write_bytes(b"\x00not a model at all" * 10)
    with pytest.raises(CheckpointError):
        load_model(path)


# Direct connections (RNNME)

def direct_config(**kw):
    return Config(hidden=8, classes=3, max_epochs=4, direct=0.004, direct_order=3, direct_l2=1e-6, **kw)


def test_direct_weights_train_with_threads_and_survive_a_checkpoint(tmp_path):
    lines = toy_text(400, seed=3)
    words, valid = words_of(lines[:340]), words_of(lines[340:])
    model = RNNLM.create(direct_config(), Vocabulary.build(words, num_classes=3))
    assert model.weights.D.shape == (4000,) and not model.weights.D.any()
    train(model, words, valid, threads=2)
    assert np.count_nonzero(model.weights.D) > 50
    assert evaluate(model, valid).perplexity < len(model.vocab) / 2

    path = tmp_path / "direct.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.config.direct_size == 4000
    np.testing.assert_array_equal(loaded.weights.D, model.weights.D)
    for rule in (None, OnlineRule(lr=0.01)):
        a = evaluate(model, valid, rule, weights=model.weights.copy())
        b = evaluate(loaded, valid, rule, weights=loaded.weights.copy())
        assert a.loss_nats == b.loss_nats


def test_a_model_without_direct_connections_is_written_as_before_they_existed(tmp_path):
    model = RNNLM.create(Config(hidden=4, classes=2), Vocabulary.build("a b c </s>".split(), 1, 2))
    path = tmp_path / "m.pt"
    save_model(model, path)
    payload = torch.load(path, weights_only=True)
    assert sorted(payload["weights"]) == ["U", "V", "W", "X"]
    assert not any(key.startswith("direct") for key in payload["config"])
    assert load_model(path).config.direct_size == 0


@pytest.mark.parametrize("damage", ["missing", "wrong size", "unexpected", "too small", "order", "rate", "nan"])
def test_damaged_direct_weights_are_refused(tmp_path, damage):
    words = "a b c d </s>".split()
    model = RNNLM.create(Config(hidden=4, classes=2, direct=0.001, direct_order=2), Vocabulary.build(words, 1, 2))
    path = tmp_path / "m.pt"
    save_model(model, path)
    payload = torch.load(path, weights_only=True)
    if damage == "missing":
        del payload["weights"]["D"]
    elif damage == "wrong size":
        payload["weights"]["D"] = torch.zeros(999)
    elif damage == "unexpected":
        payload["config"]["direct"] = 0.0
    elif damage == "too small":
        payload["config"]["direct"] = 0.000004  # 4 weights: the halves cannot hold the classes
        payload["weights"]["D"] = torch.zeros(4)
    elif damage == "order":
        payload["config"]["direct_order"] = 0
    elif damage == "rate":
        payload["config"]["direct_rate"] = "fast"
    else:
        payload["weights"]["D"][7] = float("nan")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="direct|D"):
        load_model(path)


@pytest.mark.parametrize("rate", ["fast", float("nan"), -0.5, True])
def test_a_dense_rate_that_is_not_a_finite_non_negative_number_is_refused(tmp_path, rate):
    model = RNNLM.create(Config(hidden=4, classes=2, dense_rate=0.25), Vocabulary.build("a b c d </s>".split(), 1, 2))
    path = tmp_path / "m.pt"
    save_model(model, path)
    assert load_model(path).config.dense_rate == 0.25  # kept in the file
    payload = torch.load(path, weights_only=True)
    payload["config"]["dense_rate"] = rate
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="dense rate"):
        load_model(path)
