"""An asyncio client for the rnnlm daemon, on pyzmq's `zmq.asyncio`, for FastAPI, aiohttp and the like.

    async with AsyncClient("tcp://127.0.0.1:5555") as c:
        reply = await c.score("the cat sat on the mat", stream="doc-1")
        async for reply in c.pipeline({"op": "score", "stream": "doc-2", "text": line} for line in lines):
            ...

The methods and the error policy are those of `rnnlm.clients.client.Client` (error replies raise
`DaemonError`, or come back as replies with check=False; `ReplyTimeout` after `timeout` seconds).

One client may be shared by any number of coroutines: each request gets an id and a future, one
receiver task reads every reply and resolves the future of the request it answers. A request that
timed out (or whose coroutine was cancelled) is abandoned, and its late reply is dropped by id.
Replies of one stream keep the order in which its requests were sent. In a fleet, `moved` replies
are followed as Client follows them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import AsyncIterable, Iterable

import zmq
import zmq.asyncio

from .common import (MAX_REDIRECTS, ClientError, DaemonError, EndpointError, PendingReplies, ReplyTimeout, Routes,
                     StreamNumbers, checked, connected_dealer, decode_reply, encode_request, redirect_pause,
                     score_fields)

__all__ = ["AsyncClient", "ClientError", "DaemonError", "EndpointError", "ReplyTimeout"]


class AsyncClient:
    def __init__(self, endpoint: str, timeout: float = 30.0, context: zmq.asyncio.Context | None = None,
                 curve: tuple[str, str] | None = None, retries: int = 0):
        """`curve` and `retries` as for Client. Exactly-once retries assume one score of a stream
        in flight at a time (a stream's messages are sequential anyway: each continues the last)."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.numbers = StreamNumbers()
        self.ctx = context or zmq.asyncio.Context.instance()
        self.curve = curve
        self.routes = Routes(endpoint)
        self.links: dict[str, AsyncLink] = {}
        self.socket = self.link(endpoint).socket  # the first daemon's; others are connected when a reply names them
        self.ids = itertools.count(1)
        self.stale_replies = 0  # late replies to abandoned requests, dropped

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        for link in self.links.values():
            if link.receiver is not None:
                link.receiver.cancel()
                await asyncio.gather(link.receiver, return_exceptions=True)
                link.receiver = None
            link.socket.close(0)

    def link(self, endpoint: str) -> "AsyncLink":
        if endpoint not in self.links:
            self.links[endpoint] = AsyncLink(endpoint, connected_dealer(self.ctx, endpoint, self.curve))
        return self.links[endpoint]

    # --- one request ---------------------------------------------------------------------------

    async def request(self, op: str, check: bool = True, **fields) -> dict:
        """Send one request and wait for its reply; a `moved` reply sends it again to the owner."""
        for redirects in range(MAX_REDIRECTS + 1):
            if redirects > 1:
                await asyncio.sleep(redirect_pause(redirects))
            rid, future = await self.send(op, **fields)
            reply = await self.wait(rid, future)
            if not self.routes.follow(op, fields, reply):
                break
        return checked(reply) if check else reply

    async def score(self, text: str | None = None, *, tokens: list[str] | None = None, stream: str = "default",
                    domain: str | None = None, learn: bool = True, check: bool = True) -> dict:
        fields = score_fields(text, tokens, stream, domain, learn)
        reply = await (self.score_with_retries(fields) if self.retries else self.request("score", False, **fields))
        return checked(reply) if check else reply

    async def score_with_retries(self, fields: dict) -> dict:
        """As Client.score_with_retries: the same `seq` on every attempt."""
        first_use = not self.numbers.known(fields)
        fields["seq"] = self.numbers.take(fields)
        reply, timeouts = None, 0
        try:
            while True:
                try:
                    reply = await self.request("score", False, **fields)
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

    async def reset(self, stream: str, domain: str | None = None) -> dict:
        return await self.request("reset", stream=stream, **({"domain": domain} if domain else {}))

    async def ping(self) -> dict:
        return await self.request("ping")

    async def info(self) -> dict:
        return await self.request("info")

    async def stats(self) -> dict:
        return await self.request("stats")

    async def save(self) -> dict:
        return await self.request("save")

    # --- pipelined -----------------------------------------------------------------------------

    async def pipeline(self, requests: Iterable[dict] | AsyncIterable[dict], window: int = 64, check: bool = True):
        """Send requests (dicts with 'op' and fields) keeping up to `window` in flight; yield the
        replies in request order, as Client.pipeline does (same error policy; leaving early
        abandons what is in flight)."""
        source = aiter(requests) if hasattr(requests, "__aiter__") else _as_async(requests)
        in_flight: deque[tuple[int, asyncio.Future, dict]] = deque()
        exhausted = False
        draining = False  # after a `moved`: nothing new is sent until what is in flight is settled
        try:
            while True:
                while not exhausted and not draining and len(in_flight) < window:
                    fields = await anext(source, None)
                    if fields is None:
                        exhausted = True
                    else:
                        if fields.get("op") == "score" and "stream" in fields:
                            self.numbers.forget(fields)  # pipelined messages are not numbered
                        in_flight.append((*await self.send(**fields), fields))
                if not in_flight:
                    if draining:
                        draining = False
                        continue
                    return
                rid, future, fields = in_flight[0]
                reply = await self.wait(rid, future)
                in_flight.popleft()
                request = dict(fields)
                op = request.pop("op")
                if self.routes.follow(op, request, reply):  # sent again in order, as Client.pipeline does
                    draining = True
                    reply = await self.request(op, False, **request)
                yield checked(reply) if check else reply
        finally:
            for rid, _, _ in in_flight:
                self.abandon(rid)

    # --- frames --------------------------------------------------------------------------------

    async def send(self, op: str, **fields) -> tuple[int, asyncio.Future]:
        link = self.link(self.routes.endpoint_for(op, fields))
        self.start_receiver(link)
        rid = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        # Registered before the frame leaves, with no await in between: the pending order is the
        # order on the wire, which is what matches a nil-id error to its request.
        link.pending.add(rid, future)
        try:
            await link.socket.send(encode_request(op, rid, fields))
        except BaseException:
            link.pending.abandon(rid)
            raise
        return rid, future

    async def wait(self, rid: int, future: asyncio.Future) -> dict:
        try:
            return await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            endpoint = next((l.endpoint for l in self.links.values() if rid in l.pending.waiting), self.endpoint)
            self.abandon(rid)
            raise ReplyTimeout(f"no reply from {endpoint} within {self.timeout:g} s") from None
        except BaseException:  # the caller was cancelled
            self.abandon(rid)
            raise

    def abandon(self, rid: int) -> None:
        for link in self.links.values():
            link.pending.abandon(rid)

    def start_receiver(self, link: "AsyncLink") -> None:
        if link.receiver is None or link.receiver.done():
            link.receiver = asyncio.get_running_loop().create_task(self.receive_replies(link))

    async def receive_replies(self, link: "AsyncLink") -> None:
        """The one reader of a link's socket: hands each reply to the future of the request it answers."""
        try:
            while True:
                reply = decode_reply(await link.socket.recv())
                matched = link.pending.match(reply)
                if matched is None:
                    self.stale_replies += 1
                elif not matched[1].done():
                    matched[1].set_result(reply)
        except zmq.ZMQError as err:
            for future in list(link.pending.waiting.values()):
                if isinstance(future, asyncio.Future) and not future.done():
                    future.set_exception(ClientError(f"connection to {link.endpoint} failed: {err.strerror}"))


class AsyncLink:
    """One connection: a DEALER socket to one daemon, its requests not answered yet, and its reader."""

    def __init__(self, endpoint: str, socket: zmq.asyncio.Socket):
        self.endpoint = endpoint
        self.socket = socket
        self.pending = PendingReplies()
        self.receiver: asyncio.Task | None = None


async def _as_async(items: Iterable[dict]):
    for item in items:
        yield item
