"""Mixtures of language models: EM weights, one event space, `rnnlm eval` with several models, rescoring.

Everything here is built from a tiny grammar written by the test (no shared data), so it runs
in seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from rnnlm.checkpoint import save_model
from rnnlm.cli import main
from rnnlm.corpus import EOS
from rnnlm.mixture import Mixture, NGramComponent, RNNComponent, em_weights, mix_logprobs
from rnnlm.model import RNNLM, Config, OnlineRule
from rnnlm.nbest import generate_nbest, write_nbest, write_texts
from rnnlm.ngram import build_kneser_ney, write_arpa
from rnnlm.train import train
from rnnlm.vocab import UNK, Vocabulary

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister"]
VERBS = ["sees", "likes", "eats", "finds"]
OBJECTS = ["fish", "bread", "the ball", "a red apple", "<unk>"]


def grammar(count: int, seed: int) -> list[str]:
    """Sentences 'subject verb object [and verb object]' with a few rare names mixed in."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        subject = ["zorro", "quill", "xavi"][i % 3] if i % 40 == 0 else SUBJECTS[rng.integers(len(SUBJECTS))]
        line = f"{subject} {VERBS[rng.integers(4)]} {OBJECTS[rng.integers(5)]}"
        if rng.random() < 0.3:
            line += f" and {VERBS[rng.integers(4)]} {OBJECTS[rng.integers(5)]}"
        lines.append(line)
    return lines


def tokens_of(lines):
    return [t for line in lines for t in line.split() + [EOS]]


def tiny_rnn(lines, hidden=12, seed=1, min_count=1, epochs=4) -> RNNLM:
    words = tokens_of(lines)
    config = Config(hidden=hidden, classes=4, min_count=min_count, max_epochs=epochs, seed=seed)
    model = RNNLM.create(config, Vocabulary.build(words, min_count, 4))
    if epochs:
        train(model, words, words[: len(words) // 5])
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train/valid/test text, two small RNN models and a KN trigram, as files."""
    d = tmp_path_factory.mktemp("mix")
    lines = grammar(600, seed=0)
    for name, part in (("train", lines[:400]), ("valid", lines[400:500]), ("test", lines[500:])):
        (d / f"{name}.txt").write_text("\n".join(part) + "\n")
    save_model(tiny_rnn(lines[:400], hidden=12, seed=1), d / "a.pt")
    save_model(tiny_rnn(lines[:400], hidden=8, seed=2), d / "b.pt")
    write_arpa(build_kneser_ney([l.split() for l in lines[:400]], order=3), d / "kn3.arpa")
    write_arpa(build_kneser_ney([l.split() for l in lines[:400]], order=1), d / "kn1.arpa")
    return d


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


# --------------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------------


def test_em_moves_weight_toward_the_better_model():
    # Model 1 is the better guesser on 80 % of the words, model 0 on the rest.
    rng = np.random.default_rng(0)
    first_better = rng.random(5000) < 0.8
    good, poor = np.log(rng.uniform(0.3, 0.6, 5000)), np.log(rng.uniform(0.01, 0.05, 5000))
    logp = np.vstack([np.where(first_better, poor, good), np.where(first_better, good, poor)])
    result = em_weights(logp, [0.5, 0.5])
    assert result.weights.sum() == pytest.approx(1.0)
    assert 0.7 < result.weights[1] < 0.9
    assert all(b >= a - 1e-12 for a, b in zip(result.history, result.history[1:]))  # EM never loses
    tuned = -mix_logprobs(logp, result.weights).mean()
    assert tuned < -mix_logprobs(logp, [0.5, 0.5]).mean()
    assert tuned < -logp[0].mean() and tuned < -logp[1].mean()
    # The fixed point: each weight is the mean posterior of its model.
    posterior = np.exp(logp + np.log(result.weights)[:, None] - mix_logprobs(logp, result.weights))
    assert posterior.mean(axis=1) == pytest.approx(result.weights, abs=1e-4)


def test_em_prefers_a_trained_model_to_an_untrained_one(files):
    lines = (files / "train.txt").read_text().splitlines()
    trained = RNNComponent(tiny_rnn(lines, epochs=3), "trained")
    untrained = RNNComponent(tiny_rnn(lines, epochs=0, seed=5), "untrained")
    mixture = Mixture([untrained, trained])
    valid = tokens_of((files / "valid.txt").read_text().splitlines())
    result = mixture.tune(valid)
    assert mixture.weights[1] > 0.9
    score = mixture.score(tokens_of((files / "test.txt").read_text().splitlines()))
    assert score.tally.perplexity <= min(p["perplexity"] for p in score.components) * 1.001
    assert result.iterations >= 2


# --------------------------------------------------------------------------------------------
# One event space: the mixture is a distribution
# --------------------------------------------------------------------------------------------


def next_word_probabilities(mixture: Mixture, history: list[str], events: list[str]) -> np.ndarray:
    """P(e | history) for each candidate e, each scored after the same history through the stream."""
    return np.array([math.exp(mix_logprobs(mixture.logprob_matrix(history + [e])[0], mixture.weights)[-1])
                     for e in events])


@pytest.mark.parametrize("rnn_has_unk", [True, False])
@pytest.mark.parametrize("dynamic", [False, True])
def test_interpolated_probabilities_sum_to_one_over_the_event_space(rnn_has_unk, dynamic):
    # The RNN and the n-gram know different words: each has some the other lacks, the RNN merges
    # rare names (min_count=2), and `<unk>` is in one or both training texts.
    rnn_lines = grammar(200, seed=1) + ["the cat sees a platypus", "zorro eats bread"]
    if not rnn_has_unk:
        rnn_lines = [l.replace("<unk>", "fish") for l in rnn_lines]
    kn_lines = grammar(200, seed=2) + ["a dog chases the mailman", "my friend eats <unk>"]
    model = tiny_rnn(rnn_lines, min_count=2, epochs=0)
    assert model.vocab.rare_words and (model.vocab.unk_id is not None) == rnn_has_unk
    rnn = RNNComponent(model, "rnn", OnlineRule(lr=0.1) if dynamic else None)
    kn = NGramComponent(build_kneser_ney([l.split() for l in kn_lines], order=3), "kn")
    mixture = Mixture([rnn, kn], [0.6, 0.4])
    assert "platypus" in mixture.words and "mailman" in mixture.words and UNK not in mixture.words
    assert all(n > 1 for n in mixture.lumped)  # each cannot name some of the other's words

    events = sorted(mixture.words) + ["never-seen-word"]  # W, then U
    for history in ([], "the cat sees".split(), "zorro likes a red apple </s> my".split()):
        p = next_word_probabilities(mixture, history, events)
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        # U is U whichever way it is spelled: the literal <unk> and an OOV score alike.
        assert next_word_probabilities(mixture, history, [UNK])[0] == pytest.approx(p[-1], rel=1e-6)
        for component in (rnn, kn):  # and each component on its own is a distribution too
            alone = Mixture([rnn, kn], [1.0, 0.0] if component is rnn else [0.0, 1.0])
            assert next_word_probabilities(alone, history, events).sum() == pytest.approx(1.0, abs=1e-5)


def test_components_on_a_shared_vocabulary_score_as_they_do_alone(files):
    from rnnlm.checkpoint import load_model
    from rnnlm.evaluate import evaluate
    from rnnlm.ngram import read_arpa, score_corpus

    model, lm = load_model(files / "a.pt"), read_arpa(files / "kn3.arpa")
    lines = (files / "test.txt").read_text().splitlines()
    score = Mixture([RNNComponent(model, "a"), NGramComponent(lm, "kn")], [0.75, 0.25]).score(tokens_of(lines))
    assert score.components[0]["perplexity"] == pytest.approx(evaluate(model, tokens_of(lines)).perplexity, rel=1e-9)
    assert score.components[1]["perplexity"] == pytest.approx(score_corpus(lm, [l.split() for l in lines]).perplexity, rel=1e-9)


# --------------------------------------------------------------------------------------------
# rnnlm eval
# --------------------------------------------------------------------------------------------


def eval_json(*args):
    r = run("eval", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_eval_mixes_two_models_and_an_ngram_consistently(files):
    test, a, b, kn = files / "test.txt", files / "a.pt", files / "b.pt", files / "kn3.arpa"
    mix = eval_json("--model", a, "--model", b, "--ngram", kn, "--test", test)
    for key in ("perplexity", "entropy_bits", "words", "oov", "words_per_sec", "weights", "components"):
        assert key in mix
    assert mix["words"] == len(tokens_of(test.read_text().splitlines())) and mix["oov"] == 0
    assert mix["weights"] == pytest.approx([0.375, 0.375, 0.25])
    assert 2 ** mix["entropy_bits"] == pytest.approx(mix["perplexity"], rel=1e-9)

    # Each component's perplexity is what it gets alone.
    alone = [eval_json("--model", a, "--test", test), eval_json("--model", b, "--test", test),
             eval_json("--ngram", kn, "--test", test)]
    for part, single in zip(mix["components"], alone):
        assert part["perplexity"] == pytest.approx(single["perplexity"], rel=1e-9)
    # ln Σ λP ≥ Σ λ ln P (Jensen): the mixture is no worse than the weighted geometric mean.
    bound = math.exp(sum(w * math.log(s["perplexity"]) for w, s in zip(mix["weights"], alone)))
    assert mix["perplexity"] <= bound
    # All weight on one model gives that model's perplexity.
    only_b = eval_json("--model", a, "--model", b, "--ngram", kn, "--weights", "0,1,0", "--test", test)
    assert only_b["perplexity"] == pytest.approx(alone[1]["perplexity"], rel=1e-9)
    # Tuned weights do at least as well on validation as the defaults.
    tuned = eval_json("--model", a, "--model", b, "--ngram", kn, "--tune-on", files / "valid.txt", "--test", test)
    assert sum(tuned["weights"]) == pytest.approx(1.0)
    default_valid = eval_json("--model", a, "--model", b, "--ngram", kn, "--test", files / "valid.txt")
    assert tuned["tuning"]["perplexity"] <= default_valid["perplexity"] * (1 + 1e-9)


def test_eval_dynamic_mixture_and_ngram_weight(files):
    test, a, kn = files / "test.txt", files / "a.pt", files / "kn3.arpa"
    static = eval_json("--model", a, "--ngram", kn, "--ngram-weight", 0.5, "--test", test)
    dynamic = eval_json("--model", a, "--ngram", kn, "--ngram-weight", 0.5, "--dynamic", 0.05, "--test", test)
    assert static["weights"] == dynamic["weights"] == [0.5, 0.5]
    assert dynamic["mode"] == "dynamic" and dynamic["components"][0]["dynamic"]
    single_dynamic = eval_json("--model", a, "--dynamic", 0.05, "--test", test)
    assert dynamic["components"][0]["perplexity"] == pytest.approx(single_dynamic["perplexity"], rel=1e-9)
    assert dynamic["components"][1]["perplexity"] == pytest.approx(static["components"][1]["perplexity"])


@pytest.mark.parametrize("args, message", [
    (["--weights", "0.5,0.5"], "--weights has 2 numbers for 3 models"),
    (["--weights", "0.5,0.2,0.2"], "must sum to 1"),
    (["--weights", "a,b,c"], "numbers separated by commas"),
    (["--weights", "0.4,0.4,0.2", "--ngram-weight", "0.2"], "not both"),
    (["--tune-on", "VALID", "--ngram-weight", "0.2"], "--tune-on finds the weights itself"),
])
def test_eval_mixture_errors_are_one_line(files, args, message):
    args = [str(files / "valid.txt") if a == "VALID" else a for a in args]
    r = run("eval", "--model", files / "a.pt", "--model", files / "b.pt", "--ngram", files / "kn3.arpa",
            "--test", files / "test.txt", *args)
    assert r.exit_code in (1, 2) and message in r.output and "Traceback" not in r.output


def test_eval_needs_a_model(files, tmp_path):
    r = run("eval", "--test", files / "test.txt")
    assert r.exit_code == 2 and "--model or an --ngram" in r.output
    bad = tmp_path / "bad.arpa"
    bad.write_text("not an arpa file\n")
    r = run("eval", "--ngram", bad, "--test", files / "test.txt")
    assert r.exit_code == 1 and "not an ARPA file" in r.output


# --------------------------------------------------------------------------------------------
# rnnlm rescore
# --------------------------------------------------------------------------------------------


def test_rescore_picks_better_hypotheses_with_a_better_lm(files, tmp_path):
    train_words = (files / "train.txt").read_text().split()
    nbest, refs = generate_nbest([l.split() for l in (files / "test.txt").read_text().splitlines()],
                                 n=20, seed=0, vocabulary=train_words, error_rate=0.3)
    write_nbest(nbest, tmp_path / "nbest.txt")
    write_texts(refs, tmp_path / "refs.txt")

    def wer_with(*args):
        r = run("rescore", "--nbest", tmp_path / "nbest.txt", "--refs", tmp_path / "refs.txt", *args, "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert result["errors"] == result["substitutions"] + result["deletions"] + result["insertions"]
        return result

    acoustic_only = wer_with("--lm-weight", 0)
    unigram = wer_with("--ngram", files / "kn1.arpa", "--word-penalty", 1)
    trigram = wer_with("--ngram", files / "kn3.arpa", "--word-penalty", 1, "--out", tmp_path / "best.txt")
    mixed = wer_with("--model", files / "a.pt", "--ngram", files / "kn3.arpa", "--word-penalty", 1)
    assert trigram["wer"] < unigram["wer"] and trigram["wer"] < acoustic_only["wer"]
    assert mixed["wer"] < acoustic_only["wer"]
    assert mixed["weights"] == [0.75, 0.25]
    best = dict(line.split(maxsplit=1) for line in (tmp_path / "best.txt").read_text().splitlines())
    assert len(best) == len(refs)


def test_a_direct_model_mixes_with_an_ngram_static_and_dynamic(files, tmp_path):
    lines = grammar(600, seed=0)[:400]
    words = tokens_of(lines)
    config = Config(hidden=8, classes=4, max_epochs=3, direct=0.004, direct_order=3)
    model = RNNLM.create(config, Vocabulary.build(words, 1, 4))
    train(model, words, words[: len(words) // 5])
    save_model(model, tmp_path / "direct.pt")
    test, kn = files / "test.txt", files / "kn3.arpa"
    for extra in ([], ["--dynamic", 0.05]):
        alone = eval_json("--model", tmp_path / "direct.pt", *extra, "--test", test)
        mix = eval_json("--model", tmp_path / "direct.pt", "--ngram", kn, *extra, "--test", test)
        assert mix["components"][0]["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-9)
        assert mix["perplexity"] < max(alone["perplexity"], mix["components"][1]["perplexity"])
