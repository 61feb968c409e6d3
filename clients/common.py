"""What the blocking and the asyncio client share: errors, request framing, matching replies to
requests by id, and the socket set-up (docs/protocol.md, "Writing a client")."""

from __future__ import annotations

import msgpack
import zmq

VERSION = 1


class ClientError(Exception):
    """Anything the client itself reports: a bad endpoint, a timeout, a refused request."""


class EndpointError(ClientError, ValueError):
    """The endpoint cannot be connected to (malformed, unknown transport)."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"cannot connect to {endpoint!r}: {reason}")
        self.endpoint = endpoint
        self.reason = reason


class ReplyTimeout(ClientError, TimeoutError):
    """No reply within the timeout. The daemon may still handle the request later; its reply is then
    recognised by id and dropped, and the client goes on working."""


class DaemonError(ClientError):
    """The daemon answered with an error reply; `reply` is that reply."""

    def __init__(self, code: str, message: str, reply: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply or {}


def checked(reply: dict) -> dict:
    """The reply itself when ok, else DaemonError."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise DaemonError(error.get("code", "unknown"), error.get("message", ""), reply)
    return reply


def encode_request(op: str, rid: int, fields: dict) -> bytes:
    return msgpack.packb({"v": VERSION, "op": op, "id": rid, **fields}, use_bin_type=True)


def decode_reply(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False)


def score_fields(text: str | None, tokens: list[str] | None, stream: str, domain: str | None, learn: bool) -> dict:
    fields = {"stream": stream, "learn": learn}
    if text is not None:
        fields["text"] = text
    if tokens is not None:
        fields["tokens"] = tokens
    if domain:
        fields["domain"] = domain
    return fields


# Requests that name a domain; in a fleet they go to the domain's owner (docs/protocol.md, "Fleets").
DOMAIN_OPS = frozenset({"score", "reset", "drop_domain"})
MAX_REDIRECTS = 8  # a request is sent at most this many times more after `moved` replies


def redirect_pause(redirects: int) -> float:
    """Seconds to wait before sending a request again after its `redirects`-th `moved` in a row.
    The first goes at once; more mean members that have not all applied a fleet change yet (each
    names the other), so later ones back off: 0.05, 0.1, 0.2 ... up to 1 s, about 4 s in all."""
    return 0.0 if redirects <= 1 else min(0.05 * 2 ** (redirects - 2), 1.0)


class Routes:
    """Which member of a fleet owns each domain, as learned from `moved` replies.

    A client starts with one endpoint. A member asked for a domain it does not own answers `moved`
    with the owner's name and endpoint; the client remembers the owner and sends that request, and
    every later one of the domain, straight there. A daemon that is not in a fleet never answers
    `moved`, so a client pays nothing for this beyond a dict lookup per request."""

    def __init__(self, seed: str):
        self.seed = seed
        self.owner: dict[str, str] = {}  # domain -> endpoint of its owner
        self.redirects = 0  # `moved` replies followed

    @staticmethod
    def domain_of(fields: dict) -> str:
        return fields.get("domain") or "default"

    def endpoint_for(self, op: str, fields: dict) -> str:
        if op in DOMAIN_OPS:
            return self.owner.get(self.domain_of(fields), self.seed)
        return self.seed

    def follow(self, op: str, fields: dict, reply: dict) -> bool:
        """True when `reply` is a `moved` to follow: the owner it names is remembered."""
        error = reply.get("error") or {}
        endpoint = error.get("endpoint")
        if reply.get("ok") or error.get("code") != "moved" or op not in DOMAIN_OPS or not isinstance(endpoint, str):
            return False
        self.owner[self.domain_of(fields)] = endpoint
        self.redirects += 1
        return True


def connected_dealer(ctx: zmq.Context, endpoint: str, curve: tuple[str, str] | None) -> zmq.Socket:
    """A DEALER socket connected to `endpoint`; a malformed endpoint raises EndpointError."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        if curve is not None:
            from rnnlm.daemon.auth import client_socket_keys

            client_socket_keys(socket, *curve)
        socket.connect(endpoint)
    except zmq.ZMQError as err:
        socket.close(0)
        raise EndpointError(endpoint, f"{zmq.strerror(err.errno)}; expected an endpoint such as tcp://127.0.0.1:5555 "
                                      "or ipc:///run/rnnlm.sock") from None
    except BaseException:
        socket.close(0)
        raise
    return socket


ABANDONED = object()


class PendingReplies:
    """Requests sent and not yet answered, in the order sent; matches each reply to its request.

    A request whose caller gave up (a timeout, an abandoned pipeline) stays here, marked abandoned,
    so its late reply is recognised by id and dropped instead of being taken for the answer to a
    later request. The daemon answers one connection's requests in order, which settles two cases:
    a nil-id error (a request it could not read) answers the oldest request still open, and once a
    reply arrives, abandoned requests sent before it will never be answered and are forgotten.
    """

    def __init__(self):
        self.waiting: dict[object, object] = {}  # id -> what the caller waits with, or ABANDONED

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, rid, waiter=True) -> None:
        self.waiting[rid] = waiter

    def abandon(self, rid) -> None:
        if rid in self.waiting:
            self.waiting[rid] = ABANDONED

    def match(self, reply: dict):
        """(id, waiter) of the live request this reply answers, or None for a stale or unknown one."""
        rid = reply.get("id")
        if rid is None and not reply.get("ok"):
            rid = next(iter(self.waiting), None)
            reply["id"] = rid
        if rid not in self.waiting:
            return None
        for earlier in list(self.waiting):
            if earlier == rid:
                break
            if self.waiting[earlier] is ABANDONED:
                del self.waiting[earlier]
        waiter = self.waiting.pop(rid)
        return None if waiter is ABANDONED else (rid, waiter)


class StreamNumbers:
    """The `seq` of each stream's score requests, for exactly-once learning when a request is retried
    (docs/protocol.md, "Timeouts and retries"): numbers count up from 1 per (domain, stream), a
    retry re-sends the same number, and the daemon answers a repeat of the last number it applied
    with that message's reply instead of learning from it again.

    A stream whose number this client does not know (never used here, or the fate of its last
    request is unknown) starts at 1; a daemon that has seen the stream answers `out_of_order` with
    the number it `expected`, which is adopted once, for that first request only."""

    def __init__(self):
        self.last: dict[tuple[str, str], int] = {}

    @staticmethod
    def key(fields: dict) -> tuple[str, str]:
        return fields.get("domain") or "default", fields["stream"]

    def known(self, fields: dict) -> bool:
        return self.key(fields) in self.last

    def take(self, fields: dict) -> int:
        """The next number for this stream, counted as used."""
        key = self.key(fields)
        self.last[key] = self.last.get(key, 0) + 1
        return self.last[key]

    def settle(self, fields: dict, reply: dict | None) -> None:
        """After the last attempt: a scored message keeps its number, a refused one gives it back, and
        after a timeout the stream's number is unknown (the daemon may or may not have applied it)."""
        key = self.key(fields)
        if reply is None:
            self.last.pop(key, None)
        elif not reply.get("ok"):
            self.last[key] = fields["seq"] - 1

    def adopt(self, fields: dict, reply: dict) -> bool:
        """Take the daemon's `expected` number from an out_of_order reply to a stream's first request."""
        error = reply.get("error") or {}
        expected = error.get("expected")
        if error.get("code") != "out_of_order" or not isinstance(expected, int) or expected < 1:
            return False
        self.last[self.key(fields)] = expected
        fields["seq"] = expected
        return True

    def forget(self, fields: dict) -> None:
        self.last.pop(self.key(fields), None)
