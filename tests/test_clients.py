"""The Python clients, blocking and asyncio, against a real daemon process on loopback."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from contextlib import contextmanager

import pytest

from rnnlm.clients.async_client import AsyncClient
from rnnlm.clients.client import Client, DaemonError, EndpointError, ReplyTimeout
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_path):
    """One daemon for the file; each test uses streams and domains of its own."""
    with Daemon(tmp_path_factory.mktemp("clients"), model_path) as d:
        yield d
        assert d.stop() == 0, d.output()


@contextmanager
def paused(daemon: Daemon):
    """The daemon process stopped (SIGSTOP) for the duration: requests queue up unanswered."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)


def test_client_drops_the_late_reply_after_a_timeout_and_goes_on(daemon):
    d = daemon
    with Client(d.endpoint, timeout=0.5) as c:
        assert c.ping()["pong"] is True
        with paused(d):
            with pytest.raises(TimeoutError, match="no reply"):
                c.score("the cat sees fish", stream="s")
        c.timeout = 30
        assert c.ping()["pong"] is True  # the late score reply arrives first and is dropped
        assert c.stale_replies == 1
        reply = c.score("a dog likes fish", stream="s")
        # The timed-out message was still scored: the stream had 5 tokens before this one.
        assert reply["tokens"] == 5 and reply["stream_tokens"] == 10
        assert c.info()["protocol"] == 1


def test_a_bad_endpoint_is_the_clients_own_clear_error():
    with pytest.raises(EndpointError, match="cannot connect to 'nonsense'"):
        Client("nonsense")
    with pytest.raises(EndpointError, match="tcp://"):
        AsyncClient("tcp://")


def test_score_and_pipeline_share_one_error_policy(daemon):
    """An error reply raises DaemonError from both; with check=False both hand it back."""
    requests = [{"op": "score", "stream": "p", "text": t} for t in ("the cat", "a dog", " ", "the fish", "a cat")]
    with Client(daemon.endpoint) as c:
        with pytest.raises(DaemonError) as err:
            c.score(" ", stream="p")
        assert err.value.code == "empty_text"
        assert c.score(" ", stream="p", check=False)["error"]["code"] == "empty_text"
        got = []
        with pytest.raises(DaemonError) as err:
            for reply in c.pipeline(requests, window=8):
                got.append(reply)
        assert err.value.code == "empty_text" and len(got) == 2
        assert c.ping()["pong"] is True  # the two replies still in flight were dropped on the way
        assert c.stale_replies == 2
        replies = list(c.pipeline(requests, window=8, check=False))
        assert [r["ok"] for r in replies] == [True, True, False, True, True]


def interleaved_requests(count: int, prefix: str, seed: int = 7) -> list[dict]:
    """Score messages over several streams and domains in a shuffled order, with control ops mixed in."""
    rng = random.Random(seed)
    lines = toy_text(count)
    requests = []
    for n, line in enumerate(lines):
        stream, domain = f"{prefix}s{n % 6}", f"{prefix}d{n % 3}"
        requests.append({"op": "score", "stream": stream, "domain": domain, "text": line})
    requests += [{"op": op} for op in ("ping", "info", "stats") * (count // 30)]
    rng.shuffle(requests)
    return requests


def check_kind(request: dict, reply: dict) -> None:
    assert reply["ok"], reply
    op = request["op"]
    if op == "score":
        assert reply["tokens"] == len(request["text"].split()) + 1
    elif op == "ping":
        assert reply["pong"] is True
    elif op == "info":
        assert reply["protocol"] == 1
    else:
        assert "domains" in reply


def test_async_client_shared_by_hundreds_of_coroutines(daemon):
    """300 coroutines share one AsyncClient, on 6 streams over 3 fresh domains, all in flight at once.
    Each reply must be its own request's: the same numbers as a blocking client sending the same
    messages one at a time, in the order they went out (request ids are given in that order), to
    streams and domains of their own (a new domain starts from the same base weights)."""
    requests = interleaved_requests(300, "async-")

    delays = random.Random(3)

    async def run(endpoint):
        async with AsyncClient(endpoint) as c:

            async def one(n: int, request: dict) -> dict:
                await asyncio.sleep(delays.random() * 0.01)
                fields = {k: v for k, v in request.items() if k != "op"}
                if n % 2:
                    return await c.request(request["op"], **fields)
                # Half send first and collect the reply later, as code doing other work would.
                rid, future = await c.send(request["op"], **fields)
                await asyncio.sleep(delays.random() * 0.01)
                return await c.wait(rid, future)

            return await asyncio.gather(*(one(n, r) for n, r in enumerate(requests)))

    concurrent = asyncio.run(run(daemon.endpoint))
    for request, reply in zip(requests, concurrent):
        check_kind(request, reply)
    wire_order = sorted(range(len(requests)), key=lambda i: concurrent[i]["id"])  # ids count up as sent
    replays = 0
    with Client(daemon.endpoint) as c:
        for i in wire_order:
            if requests[i]["op"] == "score":
                request = {**requests[i], "stream": "re" + requests[i]["stream"], "domain": "re" + requests[i]["domain"]}
                replay = c.request(**request)
                assert concurrent[i]["logprobs"] == pytest.approx(replay["logprobs"], rel=1e-9, abs=1e-12)
                assert concurrent[i]["stream_tokens"] == replay["stream_tokens"]
                replays += 1
    assert replays == 300


def test_async_client_pipeline_timeout_and_context_manager(daemon):
    lines = toy_text(40)

    async def run(d):
        async with AsyncClient(d.endpoint, timeout=0.5) as c:
            with paused(d):
                with pytest.raises(TimeoutError):
                    await c.score("the cat sees fish", stream="a")
                outcomes = await asyncio.gather(*(c.ping() for _ in range(5)), return_exceptions=True)
                assert all(isinstance(o, ReplyTimeout) for o in outcomes), outcomes
            c.timeout = 30
            pings = await asyncio.gather(*(c.ping() for _ in range(20)))
            assert all(p["pong"] for p in pings)
            replies = [r async for r in c.pipeline(({"op": "score", "stream": "b", "text": line} for line in lines),
                                                   window=16)]
            assert [r["tokens"] for r in replies] == [len(line.split()) + 1 for line in lines]
            assert replies[-1]["stream_tokens"] == sum(r["tokens"] for r in replies)
            with pytest.raises(DaemonError) as err:
                async for _ in c.pipeline([{"op": "score", "stream": "b", "text": " "}]):
                    pass
            assert err.value.code == "empty_text"
            assert (await c.info())["protocol"] == 1 and "domains" in await c.stats()
            assert (await c.reset("b"))["existed"] is True
            await asyncio.sleep(0.2)
            return c.stale_replies

    assert asyncio.run(run(daemon)) == 6
