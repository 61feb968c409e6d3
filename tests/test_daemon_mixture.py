"""The daemon with a mixture: extra RNNs and a Kneser–Ney model in every score (issue 4).

Real daemon processes (tests/daemon_helpers.Daemon) on models trained here, checked against
`rnnlm.mixture` offline with dynamic components and the same weights: streaming a text gives the
same total loss, whether sent as sentences or as token messages that split sentences; the metrics
show the mixture's and the primary RNN's loss; a restart resumes every component, and a restart
with a different set of models is refused.
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rnnlm.checkpoint import CheckpointError, load_model, read_checked, save_model, write_atomic
from rnnlm.cli import main
from rnnlm.clients.client import Client
from rnnlm.daemon.combination import Combination, Parts
from rnnlm.daemon.learner import STATE_FORMAT, Learner
from rnnlm.daemon.protocol import Request
from rnnlm.evaluate import evaluate
from rnnlm.mixture import Mixture, NGramComponent, RNNComponent
from rnnlm.model import OnlineRule
from rnnlm.ngram import build_kneser_ney, read_arpa, write_arpa
from tests.daemon_helpers import Daemon
from tests.test_mixture import grammar, tiny_rnn, tokens_of

DAEMON_RULE = OnlineRule(lr=0.01)  # what `rnnlm serve` learns with by default
CHUNK = 7  # tokens per `tokens` message: most messages end inside a sentence


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a.pt (the primary), b.pt (trained without the sentences that have 'bread' or '<unk>', so its
    vocabulary lacks both and the event space must be reconciled), a KN trigram, and a test text."""
    d = tmp_path_factory.mktemp("daemon-mix")
    lines = grammar(600, seed=0)
    train = lines[:400]
    save_model(tiny_rnn(train, hidden=12, seed=1), d / "a.pt")
    save_model(tiny_rnn([l for l in train if "bread" not in l and "<unk>" not in l], hidden=8, seed=2), d / "b.pt")
    write_arpa(build_kneser_ney([l.split() for l in train], order=3), d / "kn3.arpa")
    (d / "test.txt").write_text("\n".join(lines[500:560]) + "\n")
    return d


def text_lines(files) -> list[str]:
    return (files / "test.txt").read_text().splitlines()


def offline(files, names: list[str], weights: list[float]):
    """rnnlm.mixture on the whole test text, every RNN dynamic at the daemon's rate."""
    components = [RNNComponent(load_model(files / n), n, DAEMON_RULE) if n.endswith(".pt") else
                  NGramComponent(read_arpa(files / n), n) for n in names]
    return Mixture(components, weights)


def stream_tokens(client: Client, tokens: list[str], stream: str, domain: str) -> list[dict]:
    return list(client.pipeline(({"op": "score", "stream": stream, "domain": domain, "tokens": tokens[i:i + CHUNK]}
                                 for i in range(0, len(tokens), CHUNK)), window=16))


def stream_lines(client: Client, lines: list[str], stream: str, domain: str) -> list[dict]:
    return list(client.pipeline(({"op": "score", "stream": stream, "domain": domain, "text": l} for l in lines),
                                window=16))


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_rnn_plus_kn_scores_like_the_offline_mixture_and_metrics_show_both_losses(tmp_path, files):
    lines = text_lines(files)
    tokens = tokens_of(lines)
    mixture = offline(files, ["a.pt", "kn3.arpa"], [0.75, 0.25])
    want = mixture.score(tokens)
    model = load_model(files / "a.pt")
    alone = evaluate(model, tokens, DAEMON_RULE, weights=model.weights.copy())
    with Daemon(tmp_path, files / "a.pt", "--ngram", str(files / "kn3.arpa"), "--ngram-weight", "0.25") as d, \
            Client(d.endpoint) as c:
        info = c.info()
        by_lines = stream_lines(c, lines, "s", "default")
        by_tokens = stream_tokens(c, tokens, "t", "split")
        stats = c.stats()["domains"]
        c.ping()
        scrape = d.scrape()
        metric = {(name, dom): d.metric(name, domain=dom) for name in ("rnnlm_loss_nats_total", "rnnlm_rnn_loss_nats_total",
                                                                       "rnnlm_tokens_total") for dom in ("default", "split")}
        promtool = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=scrape,
                                  capture_output=True, text=True)
        assert d.stop() == 0, d.output()
    assert [(p["kind"], p["weight"]) for p in info["components"]] == [("rnn", 0.75), ("ngram", 0.25)]
    for replies, domain in ((by_lines, "default"), (by_tokens, "split")):
        loss = sum(r["loss"] for r in replies)
        rnn_loss = sum(r["rnn_loss"] for r in replies)
        assert sum(r["tokens"] for r in replies) == want.tally.words == len(tokens)
        assert close(loss, want.tally.loss_nats), (domain, loss, want.tally.loss_nats)
        assert close(rnn_loss, alone.loss_nats), (domain, rnn_loss, alone.loss_nats)
        assert replies[-1]["stream_perplexity"] == pytest.approx(want.tally.perplexity, rel=1e-4)
        for r in replies[:5]:
            assert r["loss"] == pytest.approx(-sum(r["logprobs"])) and r["rnn_loss"] == pytest.approx(-sum(r["rnn_logprobs"]))
        # Metrics: the mixture's loss (what the daemon answered) and the primary RNN's, same tokens.
        assert metric[("rnnlm_tokens_total", domain)] == len(tokens)
        assert close(metric[("rnnlm_loss_nats_total", domain)], loss, 1e-9)
        assert close(metric[("rnnlm_rnn_loss_nats_total", domain)], rnn_loss, 1e-9)
        assert close(stats[domain]["rnn_loss_nats"], rnn_loss, 1e-9) and close(stats[domain]["loss_nats"], loss, 1e-9)
    assert abs(want.tally.loss_nats - alone.loss_nats) > 1.0, "the two losses differ: the gauge has something to show"
    assert 'components="' in scrape and "kn3.arpa (ngram)" in scrape and 'weights="0.75,0.25"' in scrape
    assert promtool.returncode == 0 and not (promtool.stdout + promtool.stderr).strip(), promtool.stdout + promtool.stderr


def test_two_rnns_and_kn_on_reconciled_vocabularies(tmp_path, files):
    lines = text_lines(files)
    tokens = tokens_of(lines)
    weights = [0.45, 0.3, 0.25]
    mixture = offline(files, ["a.pt", "b.pt", "kn3.arpa"], weights)
    assert mixture.lumped[1] > 1, "b.pt names fewer words: its <rare> is shared over the ones it lacks"
    want = mixture.score(tokens)
    with Daemon(tmp_path, files / "a.pt", "--extra-model", str(files / "b.pt"), "--ngram", str(files / "kn3.arpa"),
                "--weights", "0.45,0.3,0.25") as d, Client(d.endpoint) as c:
        by_lines = stream_lines(c, lines, "s", "default")
        by_tokens = stream_tokens(c, tokens, "t", "split")
        assert d.stop() == 0, d.output()
    for replies in (by_lines, by_tokens):
        loss = sum(r["loss"] for r in replies)
        assert close(loss, want.tally.loss_nats), (loss, want.tally.loss_nats)


def test_weights_tuned_by_em_at_startup_are_the_offline_ones_and_move_to_the_better_model(tmp_path, files):
    """`serve --tune-on VALID` runs the same EM as `rnnlm eval --tune-on` (RNNs learning at the
    daemon's rate) and serves with the weights it found."""
    lines = text_lines(files)
    (tmp_path / "valid.txt").write_text("\n".join(lines[:30]) + "\n")
    mixture = offline(files, ["a.pt", "b.pt", "kn3.arpa"], [0.375, 0.375, 0.25])  # EM starts where the daemon's does
    mixture.tune(tokens_of(lines[:30]))
    with Daemon(tmp_path, files / "a.pt", "--extra-model", str(files / "b.pt"), "--ngram", str(files / "kn3.arpa"),
                "--tune-on", str(tmp_path / "valid.txt")) as d, Client(d.endpoint) as c:
        served = [p["weight"] for p in c.info()["components"]]
        assert d.stop() == 0
    assert "mixture weights tuned on" in d.output()
    np.testing.assert_allclose(served, mixture.weights, rtol=1e-12)
    alone = {n: offline(files, [n], [1.0]).score(tokens_of(lines[:30])).tally.perplexity for n in ("a.pt", "b.pt")}
    better, worse = sorted(alone, key=alone.get)
    assert served[["a.pt", "b.pt"].index(better)] > served[["a.pt", "b.pt"].index(worse)], (alone, served)


def test_a_restart_resumes_every_component_and_a_different_set_is_refused(tmp_path, files):
    """The stream is cut mid-sentence by a SIGTERM; after the restart it continues with every RNN's
    adapted weights and state and the n-gram's history, so the total is the offline one."""
    tokens = tokens_of(text_lines(files))
    want = offline(files, ["a.pt", "b.pt", "kn3.arpa"], [0.375, 0.375, 0.25]).score(tokens)
    state = tmp_path / "state"
    args = ("--extra-model", str(files / "b.pt"), "--ngram", str(files / "kn3.arpa"))
    cut = 10 * CHUNK + 3  # inside a sentence, and inside a message's worth of tokens
    with Daemon(tmp_path, files / "a.pt", *args, state_dir=state) as d, Client(d.endpoint) as c:
        first = stream_tokens(c, tokens[:cut], "t", "split")
        assert d.stop(signal.SIGTERM) == 0, d.output()
    for other in [("--ngram", str(files / "kn3.arpa")), ("--extra-model", str(files / "b.pt")), (),
                  ("--ngram", str(files / "kn3.arpa"), "--extra-model", str(files / "a.pt"))]:
        with pytest.raises(RuntimeError) as refused:
            Daemon(tmp_path, files / "a.pt", *other, state_dir=state)
        assert "but this one combines" in str(refused.value) and "--state-dir" in str(refused.value)
    with Daemon(tmp_path, files / "a.pt", *args, state_dir=state) as d, Client(d.endpoint) as c:
        assert "resumed" in d.output()
        rest = stream_tokens(c, tokens[cut:], "t", "split")
        assert d.stop() == 0, d.output()
    replies = first + rest
    assert rest[-1]["stream_tokens"] == len(tokens)
    assert close(sum(r["loss"] for r in replies), want.tally.loss_nats)


# --- restore checks, in process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def learner_payload(files):
    a = load_model(files / "a.pt")
    parts = Parts.load([str(files / "b.pt")], str(files / "kn3.arpa"), [0.4, 0.3, 0.3])

    def new():
        return Learner(a, DAEMON_RULE, combination=Combination(a, "a", parts))

    learner = new()
    tokens = tokens_of(text_lines(files))
    for i in range(0, 60, CHUNK):
        learner.score(Request("score", stream="s", tokens=tokens[i:i + CHUNK]))
    return new, learner, learner.to_payload()


def test_a_saved_mixture_state_restores_whole(learner_payload, tmp_path):
    new, learner, payload = learner_payload
    write_atomic(tmp_path / "s.pt", {"format": STATE_FORMAT, "version": 1, **payload})
    restored = new()
    restored.restore(read_checked(tmp_path / "s.pt", STATE_FORMAT), "s.pt")
    old, got = learner.streams[("default", "s")], restored.streams[("default", "s")]
    assert got.history == old.history[-2:] and len(got.extra) == 1
    np.testing.assert_array_equal(got.extra[0].hidden, old.extra[0].hidden)
    np.testing.assert_array_equal(restored.domains["default"].extra[0].V, learner.domains["default"].extra[0].V)
    assert restored.domains["default"].rnn_loss == learner.domains["default"].rnn_loss
    request = Request("score", stream="s", tokens=["the", "cat", "eats"])
    np.testing.assert_array_equal(restored.score(request).logprobs, learner.score(request).logprobs)


def damage_extra_weights(p):
    p["domains"]["default"]["extra_weights"][0]["V"] = torch.full_like(p["domains"]["default"]["extra_weights"][0]["V"], float("nan"))


def drop_extra_state(p):
    p["streams"][0]["extra_states"] = []


def bad_extra_ids(p):
    p["streams"][0]["extra_states"][0]["inputs"] = torch.full_like(p["streams"][0]["extra_states"][0]["inputs"], 10 ** 6)


def bad_history(p):
    p["streams"][0]["ngram_history"] = torch.tensor([10 ** 6], dtype=torch.int64)


def long_history(p):
    p["streams"][0]["ngram_history"] = torch.zeros(9, dtype=torch.int64)


def no_rnn_loss(p):
    del p["domains"]["default"]["rnn_loss_nats"]


@pytest.mark.parametrize("damage", [damage_extra_weights, drop_extra_state, bad_extra_ids, bad_history, long_history,
                                    no_rnn_loss])
def test_a_damaged_mixture_state_is_refused(learner_payload, damage):
    new, _, payload = learner_payload
    broken = {**payload, "domains": {k: dict(v, extra_weights=[dict(w) for w in v["extra_weights"]])
                                     for k, v in payload["domains"].items()},
              "streams": [dict(s, extra_states=[dict(x) for x in s["extra_states"]]) for s in payload["streams"]]}
    damage(broken)
    learner = new()
    with pytest.raises(CheckpointError):
        learner.restore(broken, "broken.pt")
    assert not learner.domains and not learner.streams, "nothing taken from a refused file"


@pytest.mark.parametrize("args,message", [
    (["--weights", "0.5,0.5"], "need --extra-model or --ngram"),
    (["--ngram-weight", "0.3"], "need --extra-model or --ngram"),
    (["--extra-model", "{d}/b.pt", "--ngram-weight", "0.3"], "--ngram-weight needs an --ngram model"),
    (["--extra-model", "{d}/b.pt", "--weights", "0.5,0.3,0.2"], "3 numbers for 2 models"),
    (["--extra-model", "{d}/b.pt", "--weights", "0.5,0.6"], "sum to 1"),
    (["--ngram", "{d}/missing.arpa"], "missing.arpa: no such file"),
    (["--tune-on", "{d}/test.txt"], "need --extra-model or --ngram"),
    (["--ngram", "{d}/kn3.arpa", "--tune-on", "{d}/test.txt", "--weights", "0.7,0.3"], "finds the weights itself"),
    (["--ngram", "{d}/kn3.arpa", "--tune-on", "{d}/missing.txt"], "missing.txt: no such file"),
])
def test_serve_mixture_options_are_checked(files, tmp_path, args, message):
    result = CliRunner().invoke(main, ["serve", "--model", str(files / "a.pt"), "--bind", "tcp://127.0.0.1:0",
                                       "--metrics-addr", "127.0.0.1:0", *[a.format(d=files) for a in args]])
    assert result.exit_code != 0 and message in result.output, result.output
