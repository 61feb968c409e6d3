"""The daemon as a real process: ZeroMQ on loopback, /metrics over HTTP, signals and restarts."""

from __future__ import annotations

import math
import shutil
import signal
import subprocess

import msgpack
import numpy as np
import pytest
import zmq

from rnnlm.checkpoint import load_model
from rnnlm.clients.client import Client, DaemonError
from rnnlm.evaluate import evaluate
from rnnlm.model import OnlineRule
from rnnlm.daemon import protocol
from rnnlm.daemon.learner import Learner
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text

DAEMON_RULE = OnlineRule(lr=0.01)  # the dynamic model, as `rnnlm serve` learns by default


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    tmp = tmp_path_factory.mktemp("daemon")
    with Daemon(tmp, model_path, "--max-tokens", "50", "--max-message-bytes", "4096", "--max-domains", "3",
                "--pull-bind", "tcp://127.0.0.1:0", state_dir=tmp / "state") as d:
        yield d
        assert d.stop() == 0, d.output()


def raw_request(endpoint: str, frame: bytes, kind=zmq.DEALER, timeout_ms=10_000) -> dict:
    socket = zmq.Context.instance().socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send(frame)
        assert socket.poll(timeout_ms), "no reply"
        return msgpack.unpackb(socket.recv(), raw=False)
    finally:
        socket.close()


def test_protocol_round_trip(daemon):
    with Client(daemon.endpoint) as c:
        assert c.ping()["pong"] is True
        info = c.info()
        assert info["protocol"] == 1 and info["logprob_base"] == "e" and info["vocab_size"] > 5
        reply = c.score("the cat sees fish", stream="rt")
        assert reply["ok"] and reply["id"] is not None and reply["tokens"] == 5
        assert len(reply["logprobs"]) == 5 and all(lp < 0 for lp in reply["logprobs"])
        assert reply["loss"] == pytest.approx(-sum(reply["logprobs"]))
        assert reply["stream_perplexity"] == pytest.approx(math.exp(reply["loss"] / 5))
        assert reply["learned"] == 5 and reply["updates"] >= 5
        tokens = c.score(tokens=["a", "dog", "likes", "unicornz"], stream="rt")
        assert tokens["tokens"] == 4 and tokens["oov"] == [3] and tokens["stream_tokens"] == 9
        assert c.reset("rt")["existed"] is True
        assert c.reset("rt")["existed"] is False
        stats = c.stats()
        assert stats["domains"]["default"]["tokens"] >= 9
    # A REQ client (empty delimiter frame) is served the same way.
    reply = raw_request(daemon.endpoint, msgpack.packb({"op": "ping", "id": "req-1"}), kind=zmq.REQ)
    assert reply == {"v": 1, "id": "req-1", "ok": True, "pong": True}


def test_each_word_is_scored_before_its_update(daemon):
    with Client(daemon.endpoint) as c:
        before = c.score("a dog eats bread", stream="order", domain="order", learn=False)["logprobs"]
        first = c.score("a dog eats bread", stream="order2", domain="order")
        assert first["logprobs"][0] == pytest.approx(before[0], abs=1e-6), "first word sees unchanged weights"
        assert first["learned"] == 5
        again = c.score("a dog eats bread", stream="order3", domain="order", learn=False)["logprobs"]
        assert sum(again) > sum(before), "the domain learned from what it scored"


BAD_INPUTS = [
    (b"\xc1\xc1 not msgpack", "bad_msgpack"),
    (msgpack.packb([1, 2, 3]), "bad_request"),
    (msgpack.packb({"op": "fly", "id": 1}), "unknown_op"),
    (msgpack.packb({"v": 2, "op": "ping", "id": 1}), "unsupported_version"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "text": 42}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "stream": 5, "text": "a"}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "text": "a"}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "text": "a", "tokens": ["a"]}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "text": "a", "learn": "yes"}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "tokens": ["a b"]}), "bad_request"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "text": "  \n "}), "empty_text"),
    (msgpack.packb({"op": "score", "id": 1, "stream": "s", "text": "a " * 60}), "too_many_tokens"),
    (b"\x83\xa2op\xa5score\xa6stream\xa1s\xa4text\xa2\xff\xfe", "bad_utf8"),  # str with invalid UTF-8
]


@pytest.mark.parametrize("frame,code", BAD_INPUTS, ids=[c for _, c in BAD_INPUTS])
def test_bad_input_gets_an_error_reply_and_changes_nothing(daemon, frame, code):
    with Client(daemon.endpoint) as c:
        before = c.stats()["domains"].get("default", {}).get("updates", 0)
        reply = raw_request(daemon.endpoint, frame)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        assert c.ping()["pong"] and c.stats()["domains"].get("default", {}).get("updates", 0) == before
    assert daemon.metric("rnnlm_messages_total", socket="router", op=reply_op(frame), outcome=code) >= 1


def reply_op(frame: bytes) -> str:
    try:
        message = msgpack.unpackb(frame, raw=False)
    except Exception:
        return "invalid"
    if not isinstance(message, dict):
        return "invalid"
    return message.get("op") if message.get("op") in ("score", "ping", "reset", "stats", "save", "info") else "unknown"


def test_too_many_domains_and_control_on_the_pull_socket(daemon):
    with Client(daemon.endpoint) as c:
        for name in ("d1", "d2", "d3", "d4"):
            try:
                c.score("a dog", stream="x", domain=name)  # (learn: false never creates a domain)
            except DaemonError as err:
                assert err.code == "too_many_domains"
                break
        else:
            pytest.fail("the domain limit was never hit")
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(daemon.pull_endpoint)
        push.send(msgpack.packb({"op": "save"}))
        push.send(msgpack.packb({"op": "score", "stream": "pushed", "text": "the cat likes fish"}))
        push.close(linger=2000)
        for _ in range(100):
            if daemon.metric("rnnlm_messages_total", socket="pull", op="score", outcome="ok") >= 1:
                break
            c.ping()
        assert daemon.metric("rnnlm_messages_total", socket="pull", op="save", outcome="wrong_socket") == 1
        assert daemon.metric("rnnlm_messages_total", socket="pull", op="score", outcome="ok") == 1


def test_an_oversized_frame_drops_that_peer_only(daemon):
    ctx = zmq.Context.instance()
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(daemon.endpoint)
    big.send(msgpack.packb({"op": "score", "stream": "big", "text": "a " * 5000}))
    assert big.poll(1000) == 0, "no reply to a frame over ZMQ_MAXMSGSIZE"
    big.close()
    with Client(daemon.endpoint) as c:
        assert c.ping()["pong"]


def test_metrics_scrape_counts_what_was_scored(daemon, model_path):
    lines = toy_text(20, seed=5)
    words = sum(len(line.split()) + 1 for line in lines)
    before = {name: daemon.metric(name, domain="default", **extra) for name, extra in
              [("rnnlm_tokens_total", {}), ("rnnlm_loss_nats_total", {}), ("rnnlm_updates_total", {"outcome": "applied"})]}
    with Client(daemon.endpoint) as c:
        loss = sum(c.score(line, stream="m")["loss"] for line in lines)
        running = c.stats()["domains"]["default"]["perplexity"]
    assert daemon.metric("rnnlm_tokens_total", domain="default") - before["rnnlm_tokens_total"] == words
    assert daemon.metric("rnnlm_loss_nats_total", domain="default") - before["rnnlm_loss_nats_total"] == pytest.approx(loss, rel=1e-6)
    assert daemon.metric("rnnlm_updates_total", domain="default", outcome="applied") - before["rnnlm_updates_total"] == words
    assert daemon.metric("rnnlm_perplexity", domain="default") == pytest.approx(running, rel=1e-9)
    assert daemon.metric("rnnlm_message_duration_seconds_count", op="score") >= 20
    assert daemon.metric("rnnlm_streams_active") >= 1
    text = daemon.scrape()
    assert 'rnnlm_model_info{' in text and "process_resident_memory_bytes" in text


def test_promtool_finds_nothing_to_say_about_the_metrics(daemon):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=daemon.scrape(), capture_output=True, text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_same_numbers_as_offline_evaluation(tmp_path, model_path):
    lines = toy_text(150, seed=9)
    model = load_model(model_path)
    words = [w for line in lines for w in line.split() + ["</s>"]]
    static = evaluate(model, words)
    dynamic = evaluate(model, words, DAEMON_RULE, weights=model.weights.copy())
    with Daemon(tmp_path, model_path) as d, Client(d.endpoint) as c:
        replies = list(c.pipeline(({"op": "score", "stream": "s", "text": l} for l in lines), window=32))
        frozen = list(c.pipeline(({"op": "score", "stream": "f", "domain": "frozen", "text": l, "learn": False}
                                  for l in lines), window=32))
        assert d.stop() == 0
    streamed = sum(r["loss"] for r in replies)
    assert sum(r["tokens"] for r in replies) == dynamic.words
    assert abs(streamed - dynamic.loss_nats) / dynamic.loss_nats <= 1e-4
    assert abs(sum(r["loss"] for r in frozen) - static.loss_nats) / static.loss_nats <= 1e-4
    assert replies[-1]["stream_perplexity"] == pytest.approx(dynamic.perplexity, rel=1e-4)


def test_messages_scored_in_one_call_get_the_replies_they_would_get_alone(tmp_path, model_path):
    """Pipelined messages of a stream share calls into the online step; every reply must still be
    exactly what scoring the messages one by one gives, across streams, a reset and learn: false."""
    lines = toy_text(120, seed=4)
    requests = []
    for i, line in enumerate(lines):
        stream = "a" if (i // 10) % 3 else "b"  # runs of ten messages per stream, interleaved
        requests.append({"op": "score", "stream": stream, "text": line, "learn": i % 40 < 35})
        if i == 60:
            requests.append({"op": "reset", "stream": "a"})
    replay = Learner(load_model(model_path), DAEMON_RULE)
    with Daemon(tmp_path, model_path) as d, Client(d.endpoint) as c:
        replies = list(c.pipeline(requests, window=64))
        calls = d.metric("rnnlm_step_calls_total")
    for request, reply in zip(requests, replies):
        assert reply["ok"], reply
        if request["op"] == "reset":
            assert replay.reset("default", request["stream"]) == reply["existed"]
            continue
        alone = replay.score(protocol.parse(request, 10_000))
        np.testing.assert_array_equal(np.array(reply["logprobs"]), alone.logprobs)
        assert (reply["learned"], reply["updates"]) == (alone.applied, alone.domain_updates)
        assert (reply["stream_perplexity"], reply["stream_tokens"]) == (alone.stream_perplexity, alone.stream_tokens)
    assert calls < len(lines), f"{calls} step calls for {len(lines)} pipelined messages: none shared a call"


def test_sigterm_checkpoints_and_a_restart_resumes_the_adapted_weights(tmp_path, model_path):
    state = tmp_path / "state"
    probe = "the ball eats the cat"
    with Daemon(tmp_path, model_path, state_dir=state) as d, Client(d.endpoint) as c:
        base = c.score(probe, stream="probe0", learn=False)["logprobs"]
        for _ in range(30):
            c.score(probe, stream="learner")
        adapted = c.score(probe, stream="probe1", learn=False)["logprobs"]
        updates = c.stats()["domains"]["default"]["updates"]
        assert d.stop(signal.SIGTERM) == 0
        assert "checkpoint" in d.output() and "stopped" in d.output()
    assert sum(adapted) > sum(base) + 1.0, "adaptation made the probe more likely"
    assert len(list(state.glob("state-*.pt"))) == 1
    with Daemon(tmp_path, model_path, state_dir=state) as d, Client(d.endpoint) as c:
        resumed = c.score(probe, stream="probe2", learn=False)["logprobs"]
        assert c.stats()["domains"]["default"]["updates"] == updates
        assert "resumed" in d.output()
        # The learner stream's hidden state survived too: it continues, it does not start over.
        assert c.score(probe, stream="learner", learn=False)["stream_tokens"] == 31 * 6
        assert d.stop() == 0
    np.testing.assert_allclose(resumed, adapted, rtol=0, atol=1e-9)


def test_checkpoints_rotate_and_save_on_request(tmp_path, model_path):
    state = tmp_path / "state"
    with Daemon(tmp_path, model_path, "--checkpoint-tokens", "20", "--keep-checkpoints", "2", state_dir=state) as d, \
            Client(d.endpoint) as c:
        for line in toy_text(30, seed=3):
            c.score(line, stream="rot")
        c.ping()
        path = c.save()["path"]
        assert path.endswith(".pt")
        assert d.metric("rnnlm_checkpoints_total", outcome="ok") >= 3
        assert d.metric("rnnlm_checkpoint_age_seconds") < 5
        assert d.stop() == 0
    assert len(list(state.glob("state-*.pt"))) == 2
    assert not list(state.glob(".*tmp")), "no temporary files left"


def test_save_without_state_dir_is_a_clear_error(tmp_path, model_path):
    with Daemon(tmp_path, model_path) as d, Client(d.endpoint) as c:
        with pytest.raises(DaemonError) as err:
            c.save()
        assert err.value.code == "no_state_dir"
        assert d.stop() == 0


def test_adaptation_to_a_second_domain_is_visible_in_windowed_perplexity(tmp_path, model_path):
    """After text of the training domain, text of another style arrives; the daemon's windowed
    perplexity on it (from the Prometheus counters) drops below the static model's on the same text."""
    second = [f"{a} {b} {c}" for a, b, c in zip(["the ball", "fish", "bread"] * 40, ["eats", "sees", "likes"] * 40,
                                                 ["my friend", "a dog", "the cat"] * 40)]
    model = load_model(model_path)
    first = toy_text(50, seed=4)
    with Daemon(tmp_path, model_path) as d, Client(d.endpoint) as c:
        list(c.pipeline(({"op": "score", "stream": "s", "text": l} for l in first + second[:60]), window=16))
        loss0, tokens0 = d.metric("rnnlm_loss_nats_total", domain="default"), d.metric("rnnlm_tokens_total", domain="default")
        list(c.pipeline(({"op": "score", "stream": "s", "text": l} for l in second[60:]), window=16))
        loss1, tokens1 = d.metric("rnnlm_loss_nats_total", domain="default"), d.metric("rnnlm_tokens_total", domain="default")
        assert d.stop() == 0
    windowed = math.exp((loss1 - loss0) / (tokens1 - tokens0))

    # The static model on the same text with the same context before it.
    words = [w for line in first + second for w in line.split() + ["</s>"]]
    logp: list[float] = []
    evaluate(model, words, per_word=logp)
    window = int(tokens1 - tokens0)
    static = math.exp(-sum(logp[-window:]) / window)
    assert windowed < 0.8 * static, (windowed, static)


def test_streams_are_bounded_and_evictions_counted(tmp_path, model_path):
    with Daemon(tmp_path, model_path, "--max-streams", "2") as d, Client(d.endpoint) as c:
        c.score("a dog sees fish", stream="one")
        c.score("a dog sees fish", stream="two")
        c.score("a dog sees fish", stream="three")  # the least recently used, "one", goes
        assert c.stats()["streams"] == 2
        assert c.score("the cat", stream="one")["stream_tokens"] == 3, "'one' started over"
        c.ping()
        assert d.metric("rnnlm_streams_evicted_total", reason="lru") == 2
        assert d.metric("rnnlm_streams_active") == 2
        assert d.stop() == 0
