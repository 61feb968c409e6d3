"""A Python client for the rnnlm daemon: one request at a time, or pipelined.

    with Client("tcp://127.0.0.1:5555") as c:
        reply = c.score("the cat sat on the mat", stream="doc-1")
        reply["logprobs"], reply["stream_perplexity"]

It speaks docs/protocol.md over a DEALER socket; each request carries an `id` and replies are matched
to requests by it, so a reply that arrives after its request timed out is recognised and dropped,
and the client stays usable. For asyncio code, `rnnlm.clients.async_client.AsyncClient` has the
same methods.

Errors, one policy for every method: an error reply from the daemon raises `DaemonError` (with
`.code`, `.message` and the `.reply`), from `score` and `pipeline` alike, because an error reply
is never a score and code that forgets to look at `reply["ok"]` would otherwise add a refusal into
its totals. Pass `check=False` to get error replies back as replies instead (for tools that count
outcomes). No reply within `timeout` raises `ReplyTimeout` (a `TimeoutError`); an endpoint that
cannot be connected to raises `EndpointError` (a `ValueError`); all three are `ClientError`s.

In a fleet of daemons (`rnnlm serve --fleet`), give any member's endpoint: a member asked for a
domain it does not own answers `moved`, and the client sends the request again to the owner,
remembers it, and sends that domain's later requests straight there (`client.routes`).

For a daemon running CURVE (`rnnlm serve --curve-secret-key ... --curve-authorized-dir ...`), give
this client's key pair and the daemon's public key:

    Client("tcp://host:5555", curve=("keys/alice.key_secret", "keys/server.key"))
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Iterable, Iterator

import zmq

from .common import (MAX_REDIRECTS, VERSION, ClientError, DaemonError, EndpointError, PendingReplies, ReplyTimeout,
                     Routes, StreamNumbers, checked, connected_dealer, decode_reply, encode_request, redirect_pause,
                     score_fields)

__all__ = ["Client", "ClientError", "DaemonError", "EndpointError", "ReplyTimeout", "VERSION", "score_fields"]


class Client:
    def __init__(self, endpoint: str, timeout: float = 30.0, context: zmq.Context | None = None,
                 curve: tuple[str, str] | None = None, retries: int = 0):
        """`curve`: (this client's NAME.key_secret file, the daemon's public NAME.key file).
        `retries`: how many times `score` sends a request again after a timeout; with retries, score
        requests carry per-stream sequence numbers, so a retried message is learned from once."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.numbers = StreamNumbers()
        self.ctx = context or zmq.Context.instance()
        self.curve = curve
        self.routes = Routes(endpoint)
        self.links: dict[str, Link] = {}
        self.socket = self.link(endpoint).socket  # the first daemon's; others are connected when a reply names them
        self.ids = itertools.count(1)
        self.arrived: dict[int, dict] = {}  # replies received for requests in flight, not yet asked for
        self.stale_replies = 0  # late replies to abandoned requests, dropped

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for link in self.links.values():
            link.socket.close(0)

    def link(self, endpoint: str) -> "Link":
        if endpoint not in self.links:
            self.links[endpoint] = Link(endpoint, connected_dealer(self.ctx, endpoint, self.curve))
        return self.links[endpoint]

    # --- one request at a time -----------------------------------------------------------------

    def request(self, op: str, check: bool = True, **fields) -> dict:
        """Send one request and wait for its reply; a `moved` reply sends it again to the owner."""
        for redirects in range(MAX_REDIRECTS + 1):
            time.sleep(redirect_pause(redirects))
            rid = self.send(op, **fields)
            try:
                reply = self.wait_for(rid, time.monotonic() + self.timeout)
            except BaseException:
                self.abandon(rid)
                raise
            if not self.routes.follow(op, fields, reply):
                break
        return checked(reply) if check else reply

    def score(self, text: str | None = None, *, tokens: list[str] | None = None, stream: str = "default",
              domain: str | None = None, learn: bool = True, check: bool = True) -> dict:
        fields = score_fields(text, tokens, stream, domain, learn)
        reply = self.score_with_retries(fields) if self.retries else self.request("score", False, **fields)
        return checked(reply) if check else reply

    def score_with_retries(self, fields: dict) -> dict:
        """Send, and after a timeout send again with the same `seq`: learned from once either way."""
        first_use = not self.numbers.known(fields)
        fields["seq"] = self.numbers.take(fields)
        reply, timeouts = None, 0
        try:
            while True:
                try:
                    reply = self.request("score", False, **fields)
                except ReplyTimeout:
                    reply, timeouts = None, timeouts + 1
                    if timeouts > self.retries:
                        raise
                    continue
                if first_use and self.numbers.adopt(fields, reply):  # send again under the daemon's number
                    first_use, reply = False, None
                    continue
                return reply
        finally:
            self.numbers.settle(fields, reply)

    def reset(self, stream: str, domain: str | None = None) -> dict:
        return self.request("reset", stream=stream, **({"domain": domain} if domain else {}))

    def ping(self) -> dict:
        return self.request("ping")

    def info(self) -> dict:
        return self.request("info")

    def stats(self) -> dict:
        return self.request("stats")

    def save(self) -> dict:
        return self.request("save")

    # --- pipelined -----------------------------------------------------------------------------

    def pipeline(self, requests: Iterable[dict], window: int = 64, check: bool = True) -> Iterator[dict]:
        """Send requests (dicts with 'op' and fields) keeping up to `window` in flight; yield the
        replies in request order. An error reply raises DaemonError (or, with check=False, is
        yielded like the others). Whatever ends the pipeline early (an error, a timeout, the caller
        leaving the loop) abandons the requests still in flight: the daemon still handles them, and
        their replies are dropped when they arrive."""
        in_flight: deque[tuple[int, dict]] = deque()
        requests = iter(requests)
        draining = False  # after a `moved`: nothing new is sent until what is in flight is settled
        try:
            while True:
                while not draining and len(in_flight) < window and (fields := next(requests, None)) is not None:
                    if fields.get("op") == "score" and "stream" in fields:
                        self.numbers.forget(fields)  # pipelined messages are not numbered
                    in_flight.append((self.send(**fields), fields))
                if not in_flight:
                    if draining:
                        draining = False
                        continue
                    return
                reply = self.wait_for(in_flight[0][0], time.monotonic() + self.timeout)
                rid, fields = in_flight.popleft()
                request = dict(fields)
                op = request.pop("op")
                if self.routes.follow(op, request, reply):
                    # Sent again, in order, before anything later of its stream: the ones behind it,
                    # already on their way to the old owner, come back `moved` too and are sent
                    # again when their turn comes.
                    draining = True
                    reply = self.request(op, False, **request)
                yield checked(reply) if check else reply
        finally:
            for rid, _ in in_flight:
                self.abandon(rid)

    # --- frames --------------------------------------------------------------------------------

    def send(self, op: str, **fields) -> int:
        rid = next(self.ids)
        link = self.link(self.routes.endpoint_for(op, fields))
        link.pending.add(rid)
        link.socket.send(encode_request(op, rid, fields))
        return rid

    def abandon(self, rid: int) -> None:
        self.arrived.pop(rid, None)
        for link in self.links.values():
            link.pending.abandon(rid)

    def wait_for(self, rid: int, deadline: float) -> dict:
        """The reply to request `rid`; replies to other requests in flight are kept until asked for."""
        while rid not in self.arrived:
            reply = self.receive(deadline)
            self.arrived[reply["id"]] = reply
        return self.arrived.pop(rid)

    def receive(self, deadline: float) -> dict:
        """The next reply to a request still waited for, from any daemon; stale replies are dropped."""
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            link = self.ready_link(left_ms)
            if link is None:
                waited = ", ".join(l.endpoint for l in self.links.values() if len(l.pending)) or self.endpoint
                raise ReplyTimeout(f"no reply from {waited} within {self.timeout:g} s")
            reply = decode_reply(link.socket.recv())
            if link.pending.match(reply) is not None:
                return reply
            self.stale_replies += 1

    def ready_link(self, timeout_ms: int) -> "Link | None":
        if len(self.links) == 1:  # the common case, without building a poller
            link = next(iter(self.links.values()))
            return link if link.socket.poll(timeout_ms, zmq.POLLIN) else None
        poller = zmq.Poller()
        for link in self.links.values():
            poller.register(link.socket, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        return next((l for l in self.links.values() if l.socket in ready), None)

    checked = staticmethod(checked)


class Link:
    """One connection: a DEALER socket to one daemon, and its requests not answered yet (matched
    per connection: a daemon answers each connection's requests in order)."""

    def __init__(self, endpoint: str, socket: zmq.Socket):
        self.endpoint = endpoint
        self.socket = socket
        self.pending = PendingReplies()
