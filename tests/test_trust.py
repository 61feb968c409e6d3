"""Trust: CURVE authentication, counted limits, the adaptation guard, and safe loading of state.

Real daemon processes on loopback where the claim is about the daemon; the Learner in-process
where the claim is about its arithmetic.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from rnnlm.checkpoint import CheckpointError, load_model, read_checked, weights_from_tensors, write_atomic
from rnnlm.clients.client import Client, DaemonError
from rnnlm.corpus import read_lines, tokenize_line
from rnnlm.daemon.guard import AdaptConfig, Adaptation, GuardState
from rnnlm.daemon.learner import STATE_FORMAT, Learner
from rnnlm.daemon.protocol import Request
from rnnlm.daemon.server import DEFAULT_MODEL, Server, ServeConfig
from rnnlm.evaluate import evaluate
from rnnlm.model import OnlineRule
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

SAMPLE = Path(__file__).resolve().parent.parent / "rnnlm" / "data" / "sample.txt"


def rnnlm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rnnlm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def metric_sum(daemon: Daemon, name: str) -> float:
    """Sum of every sample of one metric, whatever its labels."""
    total = 0.0
    for line in daemon.scrape().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rpartition(" ")[2])
    return total


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- CURVE + ZAP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("server", "alice", "mallory"):
        r = rnnlm("keygen", "--out", d / "keys", "--name", name)
        assert r.returncode == 0, r.stderr
        assert f"{name}.key" in r.stdout
    assert oct((d / "keys" / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    r = rnnlm("keygen", "--out", d / "keys", "--name", "alice")
    assert r.returncode == 1 and "exists already" in r.stderr
    (d / "authorized").mkdir()
    shutil.copy(d / "keys" / "alice.key", d / "authorized" / "alice.key")  # only alice is let in
    return d


def test_curve_serves_an_authorised_client_and_refuses_everyone_else(tmp_path, keys, model_path):
    k = keys / "keys"
    with Daemon(tmp_path, model_path, "--curve-secret-key", k / "server.key_secret",
                "--curve-authorized-dir", keys / "authorized", "--pull-bind", "tcp://127.0.0.1:0") as d:
        with Client(d.endpoint, curve=(k / "alice.key_secret", k / "server.key")) as alice:
            assert alice.ping()["pong"]
            reply = alice.score("the cat sees fish", stream="a")
            assert reply["tokens"] == 5 and reply["learned"] == 5
        before = {m: metric_sum(d, m) for m in ("rnnlm_tokens_total", "rnnlm_messages_total", "rnnlm_updates_total")}

        # An unknown key, a plaintext client on both sockets, and a client that has the wrong server key.
        with Client(d.endpoint, timeout=1.5, curve=(k / "mallory.key_secret", k / "server.key")) as mallory:
            with pytest.raises(TimeoutError):
                mallory.score("the cat sees fish", stream="m")
        with Client(d.endpoint, timeout=1.5) as plain:
            with pytest.raises(TimeoutError):
                plain.score("the cat sees fish", stream="p")
        with Client(d.endpoint, timeout=1.5, curve=(k / "alice.key_secret", k / "mallory.key")) as confused:
            with pytest.raises(TimeoutError):
                confused.ping()
        def plaintext_push_is_refused() -> bool:
            # A fresh plaintext PUSH each try: whether one connection's failed handshake is
            # reported before it is torn down is up to ZeroMQ's timing.
            push = zmq.Context.instance().socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(d.pull_endpoint)
            try:
                push.send(msgpack.packb({"op": "score", "stream": "pushed", "text": "a dog eats bread"}), zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.5)
            push.close(0)
            return sum(d.metric("rnnlm_handshake_failures_total", socket="pull", reason=r)
                       for r in ("auth", "protocol", "other")) >= 1

        assert wait_for(plaintext_push_is_refused, seconds=15)
        assert wait_for(lambda: d.metric("rnnlm_handshake_failures_total", socket="router", reason="auth") >= 1)
        # The plaintext and the confused client fail as "protocol" or, depending on timing, "other".
        assert wait_for(lambda: sum(d.metric("rnnlm_handshake_failures_total", socket="router", reason=r)
                                    for r in ("protocol", "other")) >= 1)
        after = {m: metric_sum(d, m) for m in before}
        assert after == before, "a refused client reached the model"
        with Client(d.endpoint, curve=(k / "alice.key_secret", k / "server.key")) as alice:
            stats = alice.stats()  # alice's own stats request is the only message since
            assert stats["domains"]["default"]["tokens"] == 5 and stats["streams"] == 1

        # The command-line client speaks CURVE too.
        text = tmp_path / "t.txt"
        text.write_text("the cat sees fish\na dog likes bread\n")
        r = rnnlm("stream", text, "--connect", d.endpoint, "--json", "--curve-secret-key", k / "alice.key_secret",
                  "--curve-server-key", k / "server.key")
        assert r.returncode == 0, r.stderr
        r = rnnlm("stream", text, "--connect", d.endpoint, "--timeout", "1", "--curve-secret-key",
                  k / "mallory.key_secret", "--curve-server-key", k / "server.key")
        assert r.returncode == 1 and "no reply" in r.stderr
        assert d.stop() == 0, d.output()
        assert "CURVE on: 1 authorised client key(s)" in d.output()


def test_curve_options_are_checked(tmp_path, keys):
    r = rnnlm("serve", "--curve-secret-key", keys / "keys" / "server.key_secret")
    assert r.returncode == 2 and "go together" in r.stderr
    r = rnnlm("serve", "--curve-secret-key", keys / "keys" / "server.key", "--curve-authorized-dir", keys / "authorized",
              "--bind", "tcp://127.0.0.1:0", "--metrics-addr", "127.0.0.1:0")
    assert r.returncode == 1 and "only a public key" in r.stderr


# --- limits, each counted ----------------------------------------------------------------------


def test_every_limit_is_counted_when_hit(tmp_path, model_path):
    with Daemon(tmp_path, model_path, "--max-tokens", "50", "--max-message-bytes", "4096", "--max-domains", "2",
                "--max-streams", "3", "--max-pending", "4") as d, Client(d.endpoint) as c:
        limits = ("message_bytes", "tokens", "streams", "domains", "pending")
        assert all(d.metric("rnnlm_limits_hit_total", limit=x) == 0 for x in limits)

        big = c.request("score", check=False, stream="s", text="a " * 2100)  # 4.2 kB: over 4096, under 2×
        assert big["error"]["code"] == "message_too_large"
        with pytest.raises(DaemonError, match="too_many_tokens"):
            c.score("a " * 60, stream="s")
        c.score("a dog", stream="s")
        c.score("a dog", stream="s", domain="d2")
        with pytest.raises(DaemonError, match="too_many_domains"):
            c.score("a dog", stream="s", domain="d3")
        for i in range(5):
            c.score("a dog", stream=f"s{i}")
        # 300 requests in flight at once: the daemon takes 4 at a time; all are answered, in order.
        replies = list(c.pipeline(({"op": "score", "stream": "p", "text": "the cat", "learn": False}
                                   for _ in range(300)), window=300))
        assert len(replies) == 300 and all(r["ok"] for r in replies)
        assert [r["id"] for r in replies] == sorted(r["id"] for r in replies)
        c.ping()
        assert wait_for(lambda: d.metric("rnnlm_limits_hit_total", limit="streams") >= 3)
        hits = {x: d.metric("rnnlm_limits_hit_total", limit=x) for x in limits}
        print("limits hit:", hits)
        assert hits["message_bytes"] == 1 and hits["tokens"] == 1 and hits["domains"] == 1
        assert hits["pending"] >= 1
        assert d.metric("rnnlm_streams_evicted_total", reason="lru") == hits["streams"]
        assert d.stop() == 0


# --- the adaptation guard -------------------------------------------------------------------------


def poison(seed: int = 0) -> list[list[str]]:
    """Random words, then one word repeated thousands of times."""
    model = load_model(DEFAULT_MODEL)
    words = [w for w in model.vocab.words if not w.startswith("<")]
    rng = np.random.default_rng(seed)
    noise = [str(w) for w in rng.choice(words, 3000)]
    return [noise[i:i + 50] for i in range(0, 3000, 50)] + [["the"] * 100 for _ in range(50)]


def domain_weights(path: str, domain: str):
    model = load_model(DEFAULT_MODEL)
    d = read_checked(path, STATE_FORMAT)["domains"][domain]
    return weights_from_tensors(d["weights"], len(model.vocab), model.config.hidden, model.vocab.num_classes, path)


def test_the_guard_rolls_a_poisoned_domain_back_and_clean_quality_returns(tmp_path):
    """Clean text, then a poisoned stream, then clean text again. The guard (shadow on every
    message, 10 % margin over 300 tokens) fires in the first window of clean text after the poison
    and puts the domain back; its perplexity on held-out clean text is then that of the base
    model, while the same traffic without the guard leaves it far worse at the same point."""
    model = load_model(DEFAULT_MODEL)
    lines = read_lines(SAMPLE)
    clean, held_out, resumed = lines[:60], lines[60:75], lines[75:135]
    probe = [t for line in held_out for t in tokenize_line(line)]

    def perplexity(weights) -> float:
        return evaluate(model, probe, weights=weights).perplexity

    bad = poison()
    with Daemon(tmp_path, None, "--shadow-sample", "1", "--guard-margin", "0.1", "--guard-window", "300",
                state_dir=tmp_path / "state") as d, Client(d.endpoint) as c:
        list(c.pipeline({"op": "score", "stream": "news", "domain": "news", "text": line} for line in clean))
        good = perplexity(domain_weights(c.save()["path"], "news"))
        list(c.pipeline({"op": "score", "stream": "spam", "domain": "news", "tokens": t} for t in bad))
        poisoned = perplexity(domain_weights(c.save()["path"], "news"))
        rollbacks_in_poison = c.stats()["domains"]["news"]["rollbacks"]
        fired_at = None
        for k, line in enumerate(resumed):
            c.score(line, stream="news", domain="news")
            if c.stats()["domains"]["news"]["rollbacks"] > rollbacks_in_poison:
                fired_at = k
                break
        assert fired_at is not None, "the guard never fired"
        after = perplexity(domain_weights(c.save()["path"], "news"))
        rollbacks = d.metric("rnnlm_rollbacks_total", domain="news")
        base_tokens, sampled_tokens = (d.metric(f"rnnlm_{m}_tokens_total", domain="news") for m in ("base", "sampled"))
        base_loss, sampled_loss = (d.metric(f"rnnlm_{m}_loss_nats_total", domain="news") for m in ("base", "sampled"))
        assert d.stop() == 0
    assert "rolled back" in d.output()

    # The same traffic, no guard: where is the domain at the same point?
    control = Learner(model, OnlineRule(lr=0.01))
    for line in clean:
        control.score(Request("score", stream="news", domain="news", sentences=[line.split()]))
    for tokens in bad:
        control.score(Request("score", stream="spam", domain="news", tokens=tokens))
    for line in resumed[:fired_at + 1]:
        control.score(Request("score", stream="news", domain="news", sentences=[line.split()]))
    unguarded = perplexity(control.domains["news"].weights)
    base = perplexity(model.weights)
    print(f"held-out perplexity: base {base:.1f}, adapted on clean {good:.1f}, poisoned {poisoned:.1f}; "
          f"guard fired after {fired_at + 1} clean message(s) ({rollbacks:.0f} rollback(s) in all): {after:.1f} "
          f"with the guard, {unguarded:.1f} without")
    print(f"shadow: {base_tokens:.0f} tokens, base {math.exp(base_loss / base_tokens):.1f} vs adapted "
          f"{math.exp(sampled_loss / sampled_tokens):.1f} perplexity on the sample")
    assert poisoned > 3 * base, "the poison did damage"
    assert rollbacks >= 1 and base_tokens == sampled_tokens > 0
    assert min(abs(after - base), abs(after - good)) <= 0.1 * base, "clean quality is back to base or last good"
    assert unguarded > 1.5 * after, "without the guard the domain is still damaged at that point"


def test_a_rollback_prefers_the_last_good_state_when_it_passes_on_the_failed_window():
    model = load_model(DEFAULT_MODEL)
    lines = read_lines(SAMPLE)
    adaptation = Adaptation(AdaptConfig(shadow_sample=1, guard_margin=0.1, guard_window=10), model)
    learner = Learner(model, OnlineRule(lr=0.01))
    for line in lines[:40]:
        learner.score(Request("score", stream="s", domain="d", sentences=[line.split()]))
    good = learner.domains["d"].weights.copy()
    guard = GuardState(last_good=good, window_words=[tokenize_line(line) for line in lines[40:50]])
    weights = model.weights.copy()
    weights.V *= 0.0  # garbage: every word equally likely
    assert "its last good state" in adaptation.roll_back(guard, weights, "test")
    assert all((getattr(weights, n) == getattr(good, n)).all() for n in weights.NAMES)
    # A second failure in a row goes to the base model.
    assert "the base model" in adaptation.roll_back(guard, weights, "test")
    assert all((getattr(weights, n) == getattr(model.weights, n)).all() for n in weights.NAMES)


def test_decay_pulls_adapted_weights_toward_the_base(model_path):
    model = load_model(model_path)
    lines = toy_text(30, seed=2)
    plain = Learner(model, OnlineRule(lr=0.01))
    decayed = Learner(model, OnlineRule(lr=0.01), adapt=AdaptConfig(decay_to_base=0.25))
    full = Learner(model, OnlineRule(lr=0.01), adapt=AdaptConfig(decay_to_base=1.0))
    first = Request("score", stream="s", sentences=[lines[0].split()])
    for learner in (plain, decayed, full):
        learner.score(first)
    base, stepped, pulled = model.weights, plain.domains["default"].weights, decayed.domains["default"].weights
    for name in base.NAMES:
        expected = getattr(stepped, name) + 0.25 * (getattr(base, name) - getattr(stepped, name))
        np.testing.assert_allclose(getattr(pulled, name), expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(getattr(full.domains["default"].weights, name), getattr(base, name))
    assert not all((getattr(stepped, n) == getattr(base, n)).all() for n in base.NAMES), "the step did move"
    for line in lines[1:]:
        for learner in (plain, decayed):
            learner.score(Request("score", stream="s", sentences=[line.split()]))
    drift = {id(l): sum(float(np.abs(getattr(l.domains["default"].weights, n) - getattr(base, n)).sum())
                        for n in base.NAMES) for l in (plain, decayed)}
    assert drift[id(decayed)] < 0.5 * drift[id(plain)]


def test_non_finite_losses_skip_the_update_are_counted_and_roll_the_domain_back(model_path):
    """The compiled step skips a word whose ln P is not finite; the daemon counts it as
    rnnlm_updates_total{outcome="skipped"} and puts a domain with non-finite weights back."""
    model = load_model(model_path)
    server = Server(ServeConfig())
    server.learner = Learner(model, OnlineRule(lr=0.01))
    server.learner.domain("broken").weights.V[:] = np.nan
    request = Request("score", id=1, stream="s", domain="broken", sentences=[["the", "cat", "sees", "fish"]])
    reply = server.op_score(request)
    assert reply["learned"] == 0 and reply["tokens"] == 5 and all(math.isnan(x) for x in reply["logprobs"])
    registry = server.metrics.registry
    assert registry.get_sample_value("rnnlm_updates_total", {"domain": "broken", "outcome": "skipped"}) == 5
    assert registry.get_sample_value("rnnlm_rollbacks_total", {"domain": "broken"}) == 1
    assert server.learner.domains["broken"].weights.all_finite()
    again = server.op_score(Request("score", id=2, stream="s2", domain="broken", sentences=[["the", "cat"]]))
    assert again["learned"] == 3 and all(math.isfinite(x) for x in again["logprobs"])


# --- safe loading -------------------------------------------------------------------------------


class Exploit:
    """Unpickling this runs a shell command (if the loader allows it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved_states(tmp_path_factory, model_path):
    """A state directory with two checkpoints of a daemon that learned something."""
    tmp = tmp_path_factory.mktemp("states")
    state = tmp / "state"
    with Daemon(tmp, model_path, state_dir=state) as d, Client(d.endpoint) as c:
        for line in toy_text(20, seed=1):
            c.score(line, stream="s")
        c.save()
        for line in toy_text(20, seed=2):
            c.score(line, stream="s")
        assert d.stop() == 0
    files = sorted(state.glob("state-*.pt"))
    assert len(files) == 2
    return state


def tampered_copy(saved_states: Path, tmp_path: Path, tamper) -> tuple[Path, Path]:
    """A copy of the state directory whose newest checkpoint was changed by `tamper(payload, path)`."""
    state = tmp_path / "state"
    shutil.copytree(saved_states, state)
    newest = sorted(state.glob("state-*.pt"))[-1]
    payload = torch.load(newest, weights_only=True)
    tamper(payload, newest)
    return state, newest


def _reshaped(payload, path):
    payload["domains"]["default"]["weights"]["U"] = payload["domains"]["default"]["weights"]["U"][:, :-1].clone()
    write_atomic(path, payload)


def _double(payload, path):
    payload["domains"]["default"]["weights"]["W"] = payload["domains"]["default"]["weights"]["W"].double()
    write_atomic(path, payload)


def _word_ids_out_of_range(payload, path):
    payload["stream_states"]["inputs"][0][:] = 10 ** 8  # would index far outside U in the compiled step
    write_atomic(path, payload)


def _nan_hidden(payload, path):
    payload["stream_states"]["hidden"][0, 0, 0] = float("nan")
    write_atomic(path, payload)


def _exploit_pickle(payload, path):
    payload["evicted"] = Exploit(path.parent / "PWNED")
    with open(path, "wb") as f:
        torch.save(payload, f)  # torch.save pickles the object's __reduce__: os.system on load


def _raw_pickle(payload, path):
    with open(path, "wb") as f:
        pickle.dump({"format": STATE_FORMAT, "x": Exploit(path.parent / "PWNED")}, f)


def _truncated(payload, path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


TAMPERING = [_reshaped, _double, _word_ids_out_of_range, _nan_hidden, _exploit_pickle, _raw_pickle, _truncated]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("tamper", TAMPERING, ids=[t.__name__.strip("_") for t in TAMPERING])
def test_a_tampered_newest_checkpoint_is_skipped_for_the_one_before(saved_states, tmp_path, model_path, tamper, caplog):
    state, newest = tampered_copy(saved_states, tmp_path, tamper)
    previous = read_checked(sorted(state.glob("state-*.pt"))[-2], STATE_FORMAT)
    server = Server(ServeConfig(model=str(model_path), state_dir=str(state)))
    with caplog.at_level("WARNING"):
        learner = server.load_learner()
    assert not (state / "PWNED").exists(), "loading a checkpoint ran code"
    assert f"skipping {newest}" in caplog.text
    print(caplog.records[0].getMessage())
    assert learner.domains["default"].updates == previous["domains"]["default"]["updates"]
    assert server.checkpoint_seq == int(newest.stem.split("-")[-1]), "the next checkpoint gets a new name"


def test_a_daemon_whose_checkpoints_are_all_tampered_refuses_to_start(saved_states, tmp_path, model_path):
    state = tmp_path / "state"
    shutil.copytree(saved_states, state)
    for path in state.glob("state-*.pt"):
        _exploit_pickle(torch.load(path, weights_only=True), path)
    r = rnnlm("serve", "--model", model_path, "--state-dir", state, "--bind", "tcp://127.0.0.1:0",
              "--metrics-addr", "127.0.0.1:0")
    assert r.returncode == 1
    assert not (state / "PWNED").exists()
    error = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert error and "none of its 2 checkpoint file(s) can be used" in error[0], r.stderr
    assert "refused: it holds code" in r.stderr and "posix.system" in r.stderr
    assert "weights_only" not in r.stderr, "no advice to turn the protection off"
    print(error[0])


def test_a_model_file_with_code_in_it_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "rnnlm-model", "version": 1, "x": Exploit(tmp_path / "PWNED")}, path)
    with pytest.raises(CheckpointError, match="refused: it holds code"):
        load_model(path)
    r = rnnlm("serve", "--model", path, "--bind", "tcp://127.0.0.1:0", "--metrics-addr", "127.0.0.1:0")
    assert r.returncode == 1 and r.stderr.startswith("Error:") and "refused: it holds code" in r.stderr
    assert not (tmp_path / "PWNED").exists()
