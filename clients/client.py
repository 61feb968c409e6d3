"""A Python client for the rnnlm daemon: one request at a time, or pipelined.

    with Client("tcp://127.0.0.1:5555") as c:
        reply = c.score("the cat sat on the mat", stream="doc-1")
        reply["logprobs"], reply["stream_perplexity"]

It speaks docs/protocol.md over a DEALER socket; each request carries an `id` and replies are matched
to requests by it.

For a daemon running CURVE (`rnnlm serve --curve-secret-key ... --curve-authorized-dir ...`), give
this client's key pair and the daemon's public key:

    Client("tcp://host:5555", curve=("keys/alice.key_secret", "keys/server.key"))
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable, Iterator

import msgpack
import zmq

VERSION = 1


class DaemonError(Exception):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    def __init__(self, endpoint: str, timeout: float = 30.0, context: zmq.Context | None = None,
                 curve: tuple[str, str] | None = None):
        """`curve`: (this client's NAME.key_secret file, the daemon's public NAME.key file)."""
        self.endpoint = endpoint
        self.timeout_ms = int(timeout * 1000)
        self.ctx = context or zmq.Context.instance()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            from rnnlm.daemon.auth import client_socket_keys

            try:
                client_socket_keys(self.socket, *curve)
            except BaseException:
                self.socket.close(0)
                raise
        self.socket.connect(endpoint)
        self.ids = itertools.count(1)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close(0)

    # --- one request at a time -----------------------------------------------------------------

    def request(self, op: str, check: bool = True, **fields) -> dict:
        rid = self.send(op, **fields)
        reply = self.receive()
        if reply.get("id") is None and not reply.get("ok"):
            reply["id"] = rid  # an error for a request the daemon could not read (docs/protocol.md, Replies)
        if reply.get("id") != rid:
            raise RuntimeError(f"reply for request {reply.get('id')!r} arrived while waiting for {rid}")
        return self.checked(reply) if check else reply

    def score(self, text: str | None = None, *, tokens: list[str] | None = None, stream: str = "default",
              domain: str | None = None, learn: bool = True) -> dict:
        return self.request("score", **score_fields(text, tokens, stream, domain, learn))

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

    def pipeline(self, requests: Iterable[dict], window: int = 64) -> Iterator[dict]:
        """Send requests (dicts with 'op' and fields) keeping up to `window` in flight; yield
        replies in request order. Error replies are yielded too (check reply['ok'])."""
        in_flight: deque[int] = deque()
        waiting: dict[int, dict] = {}
        requests = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < window:
                fields = next(requests, None)
                if fields is None:
                    exhausted = True
                    break
                in_flight.append(self.send(**fields))
            if not in_flight:
                return
            while in_flight[0] not in waiting:
                reply = self.receive()
                if reply.get("id") is None and not reply.get("ok"):
                    # Unreadable requests are answered with id nil; replies come in request order,
                    # so it answers the oldest request not answered yet.
                    reply["id"] = next(i for i in in_flight if i not in waiting)
                waiting[reply.get("id")] = reply
            yield waiting.pop(in_flight.popleft())

    # --- frames --------------------------------------------------------------------------------

    def send(self, op: str, **fields) -> int:
        rid = next(self.ids)
        self.socket.send(msgpack.packb({"v": VERSION, "op": op, "id": rid, **fields}, use_bin_type=True))
        return rid

    def receive(self) -> dict:
        if not self.socket.poll(self.timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout_ms / 1000:g} s")
        return msgpack.unpackb(self.socket.recv(), raw=False)

    @staticmethod
    def checked(reply: dict) -> dict:
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise DaemonError(error.get("code", "unknown"), error.get("message", ""))
        return reply


def score_fields(text: str | None, tokens: list[str] | None, stream: str, domain: str | None, learn: bool) -> dict:
    fields = {"stream": stream, "learn": learn}
    if text is not None:
        fields["text"] = text
    if tokens is not None:
        fields["tokens"] = tokens
    if domain:
        fields["domain"] = domain
    return fields
