"""What operators and client writers see: metrics as Prometheus users expect them, and protocol
messages with no Python spellings in them."""

from __future__ import annotations

import shutil
import subprocess

import msgpack
import pytest
import zmq

from rnnlm.clients.client import Client
from tests.daemon_helpers import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    with Daemon(tmp_path_factory.mktemp("operator"), model_path, "--pull-bind", "tcp://127.0.0.1:0") as d:
        yield d
        assert d.stop() == 0, d.output()


def samples(scrape: str) -> dict[str, float]:
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in scrape.splitlines() if line and not line.startswith("#")}


def test_metrics_at_start_build_info_and_no_created_series(daemon):
    scrape = daemon.scrape()
    found = samples(scrape)
    build = next(k for k in found if k.startswith("rnnlm_build_info{"))
    for label in ("version=", "python=", "torch=", "numba="):
        assert label in build, build
    assert 'version="0.1.0"' in build and 'torch="2.13.0' in build
    model = next(k for k in found if k.startswith("rnnlm_model_info{"))
    assert 'learning="true"' in model, model
    assert not [k for k in found if "_created" in k], "no *_created series"
    # Series that exist from the start at 0, so rate() is 0 rather than "no data".
    for series in ('rnnlm_updates_total{domain="default",outcome="skipped"}',
                   'rnnlm_updates_total{domain="default",outcome="applied"}',
                   'rnnlm_rollbacks_total{domain="default"}',
                   'rnnlm_tokens_total{domain="default"}',
                   'rnnlm_messages_total{op="score",outcome="ok",socket="router"}',
                   'rnnlm_messages_total{op="score",outcome="ok",socket="pull"}',
                   'rnnlm_messages_total{op="info",outcome="ok",socket="router"}'):
        assert series in found, series
    for histogram in ("rnnlm_message_tokens_bucket", "rnnlm_queue_wait_seconds_bucket"):
        assert any(k.startswith(histogram) for k in found), histogram


def test_histograms_of_tokens_and_queue_wait_and_new_domains(daemon):
    before = samples(daemon.scrape())
    with Client(daemon.endpoint) as c:
        list(c.pipeline({"op": "score", "stream": "h", "domain": "news", "text": "the cat sees fish"} for _ in range(20)))
    after = samples(daemon.scrape())
    assert after["rnnlm_message_tokens_count"] - before.get("rnnlm_message_tokens_count", 0) == 20
    assert after["rnnlm_message_tokens_sum"] - before.get("rnnlm_message_tokens_sum", 0) == 100
    assert after['rnnlm_message_tokens_bucket{le="5.0"}'] - before['rnnlm_message_tokens_bucket{le="5.0"}'] == 20
    assert after["rnnlm_queue_wait_seconds_count"] - before["rnnlm_queue_wait_seconds_count"] == 20
    assert after["rnnlm_queue_wait_seconds_sum"] > before["rnnlm_queue_wait_seconds_sum"]
    assert after['rnnlm_updates_total{domain="news",outcome="skipped"}'] == 0
    assert after['rnnlm_rollbacks_total{domain="news"}'] == 0


def test_promtool_is_still_content(daemon):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: bin/test installs Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=daemon.scrape(), capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


def raw(endpoint: str, request: dict) -> dict:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send(msgpack.packb(request))
        assert socket.poll(10_000), "no reply"
        return msgpack.unpackb(socket.recv())
    finally:
        socket.close()


@pytest.mark.parametrize("request_, code, text", [
    ({"v": 1, "id": 1}, "bad_request", "'op' is required"),
    ({"v": None, "op": "ping", "id": 2}, "unsupported_version", "protocol version nil"),
    ({"v": 1.0, "op": "ping", "id": 3}, "unsupported_version", "protocol version 1.0"),
    ({"v": True, "op": "ping", "id": 4}, "unsupported_version", "protocol version true"),
    ({"v": 1, "op": None, "id": 5}, "bad_request", "'op' is required"),
    ({"v": 1, "op": False, "id": 6}, "unknown_op", "unknown op false"),
])
def test_error_messages_have_no_python_spellings(daemon, request_, code, text):
    reply = raw(daemon.endpoint, request_)
    assert not reply["ok"] and reply["error"]["code"] == code and text in reply["error"]["message"], reply
    assert reply["id"] == request_["id"]
    for python in ("None", "True", "False"):
        assert python not in reply["error"]["message"], reply


def test_ids_of_other_types_come_back_nil(daemon):
    assert raw(daemon.endpoint, {"op": "ping", "id": True})["id"] is None
    assert raw(daemon.endpoint, {"op": "ping", "id": [1]})["id"] is None
    assert raw(daemon.endpoint, {"op": "ping", "id": 1.5})["id"] == 1.5


def test_stats_counts_tokens(daemon):
    with Client(daemon.endpoint) as c:
        c.score("the cat sees fish", stream="stats", domain="counted")
        domain = c.stats()["domains"]["counted"]
    assert domain["tokens"] == 5 and "words" not in domain
