"""The wire protocol (see docs/protocol.md): msgpack maps in, msgpack maps out, version 1.

Everything a client can get wrong is caught here and turned into a `ProtocolError` with a stable
code; the server answers it and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import zmq

from rnnlm.corpus import EOS

VERSION = 1
OPS = ("score", "reset", "stats", "save", "ping", "info", "drop_domain")
DATA_OPS = ("score",)  # the only op accepted on the fire-and-forget PULL socket
ADMIN_OPS = ("save", "reset", "drop_domain")  # with --curve-admin-dir, only admin keys may send these
DOMAIN_OPS = ("score", "reset", "drop_domain")  # name a domain: in a fleet, only its owner takes them
DEFAULT_DOMAIN = "default"
MAX_NAME = 128  # stream and domain names, in characters

# The bounds a client can run into, each counted in rnnlm_limits_hit_total{limit=...} (a fixed set,
# so the label stays bounded): error codes that mean a limit was hit, and the limits the server
# meets on its own (the LRU stream bound, the in-hand queue).
LIMIT_OF_CODE = {"message_too_large": "message_bytes", "too_many_tokens": "tokens", "too_many_domains": "domains",
                 "memory_budget": "memory"}
LIMITS = ("message_bytes", "tokens", "streams", "domains", "pending", "memory")


MAX_SEQ = 2**63 - 1  # sequence numbers fit msgpack's int64


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, **details):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details  # extra fields of the error map (out_of_order: expected)


@dataclass
class Request:
    op: str
    id: object = None
    stream: str = ""
    domain: str = DEFAULT_DOMAIN
    sentences: list[list[str]] | None = None  # score: words per sentence; `</s>` added to each
    tokens: list[str] | None = None  # score: tokens as given, nothing added
    learn: bool = True
    seq: int | None = None  # score: the stream's sequence number, for exactly-once retries
    _words: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def words(self) -> list[str]:
        """The words a score message asks for: its tokens as given, or its sentences each ending
        in </s> (made once per message: scoring, batching and metrics all read them)."""
        if self._words is None:
            self._words = self.tokens if self.tokens is not None else [
                w for sentence in self.sentences for w in (*sentence, EOS)]
        return self._words


@dataclass
class Received:
    """One message as read from a socket: its first frames, and how many frames and bytes it had."""

    frames: list[bytes]  # at most MAX_FRAMES; the rest were read and dropped
    count: int
    size: int
    user: str | None = None  # with CURVE: the client's public key (Z85), as the ZAP handler named it


# A request is one frame; on ROUTER it arrives behind the connection's identity and, from a REQ
# client, an empty delimiter. Nothing longer is ever kept or echoed.
MAX_FRAMES = 3


def read_message(socket) -> Received | None:
    """Read one whole message without blocking (None when nothing is waiting).

    Frames past MAX_FRAMES are read and dropped one by one, so a message of many frames never
    sits in our memory whole (each frame is bounded by ZMQ_MAXMSGSIZE)."""
    try:
        frame = socket.recv(zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None
    received = Received([frame.bytes], 1, len(frame), _user_of(frame))
    while frame.more:
        frame = socket.recv(copy=False)  # ZeroMQ delivers a message whole: the rest is already here
        received.count += 1
        received.size += len(frame)
        if received.count <= MAX_FRAMES:
            received.frames.append(frame.bytes)
    return received


def _user_of(frame) -> str | None:
    try:
        return frame.get("User-Id") or None
    except (zmq.ZMQError, KeyError):
        return None


def split_envelope(received: Received, from_router: bool) -> tuple[list[bytes], bytes]:
    """The routing frames and the request frame; ProtocolError for any other shape.

    ROUTER: the identity, at most one empty delimiter (a REQ client's), the request. PULL: the
    request alone. The error reply to a bad shape goes back to the identity alone."""
    frames = received.frames
    if from_router:
        ok = received.count == 2 or (received.count == 3 and frames[1] == b"")
    else:
        ok = received.count == 1
    if not ok:
        raise ProtocolError("bad_request", f"a request is one frame (after a REQ socket's empty delimiter); "
                                           f"this message had {received.count - from_router} frames of "
                                           f"{received.size} bytes in all")
    return frames[:-1], frames[-1]


def check_size(frame: bytes, max_bytes: int) -> None:
    """Frames up to the hard ceiling (ZMQ_MAXMSGSIZE, twice the limit) reach us and are refused here."""
    if len(frame) > max_bytes:
        raise ProtocolError("message_too_large", f"a {len(frame)}-byte message; the limit is {max_bytes} bytes")


def hard_frame_limit(max_bytes: int) -> int:
    """ZMQ_MAXMSGSIZE: a peer sending a bigger frame is disconnected by ZeroMQ without a reply."""
    return 2 * max_bytes


def decode(frame: bytes) -> dict:
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "a string in the message is not valid UTF-8") from None
    except Exception:
        raise ProtocolError("bad_msgpack", "the frame is not a msgpack message") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_request", "a request must be a msgpack map")
    return message


def request_id(message) -> object:
    """The `id` to echo, if it is an int, string, binary or float (anything else, booleans
    included, is answered with nil)."""
    rid = message.get("id") if isinstance(message, dict) else None
    return rid if isinstance(rid, (int, str, bytes, float)) and not isinstance(rid, bool) else None


def spelled(value) -> str:
    """A value as msgpack/JSON spell it, for error messages: nil, true, 1.0, "text"."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value[:40] + ('…' if len(value) > 40 else '') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    return f"a {type(value).__name__.replace('dict', 'map').replace('list', 'array')}"


def _name(message: dict, key: str, default: str | None) -> str:
    value = message.get(key, default)
    if value is None:
        raise ProtocolError("bad_request", f"'{key}' is required")
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ProtocolError("bad_request", f"'{key}' must be a non-empty string of at most {MAX_NAME} characters")
    return value


def parse(message: dict, max_tokens: int) -> Request:
    version = message.get("v", VERSION)
    if type(version) is not int or version != VERSION:  # an int: 1.0 and true are not 1
        raise ProtocolError("unsupported_version",
                            f"protocol version {spelled(version)} is not supported (this daemon speaks the int {VERSION})")
    op = message.get("op")
    if op is None:
        raise ProtocolError("bad_request", f"'op' is required: one of {', '.join(OPS)}")
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {spelled(op)}; expected one of {', '.join(OPS)}")
    request = Request(op=op, id=request_id(message))
    if op in ("score", "reset"):
        request.stream = _name(message, "stream", None)
        request.domain = _name(message, "domain", DEFAULT_DOMAIN)
    if op == "drop_domain":
        request.domain = _name(message, "domain", None)
    if op == "score":
        learn = message.get("learn", True)
        if not isinstance(learn, bool):
            raise ProtocolError("bad_request", "'learn' must be true or false")
        request.learn = learn
        request.seq = _seq(message)
        _parse_text(message, request, max_tokens)
    return request


def _seq(message: dict) -> int | None:
    seq = message.get("seq")
    if seq is not None and (type(seq) is not int or not 1 <= seq <= MAX_SEQ):
        raise ProtocolError("bad_request", f"'seq' must be an int from 1 to {MAX_SEQ}, got {spelled(seq)}")
    return seq


def _parse_text(message: dict, request: Request, max_tokens: int) -> None:
    text, tokens = message.get("text"), message.get("tokens")
    if (text is None) == (tokens is None):
        raise ProtocolError("bad_request", "a score request carries exactly one of 'text' or 'tokens'")
    if text is not None:
        if not isinstance(text, str):
            raise ProtocolError("bad_request", "'text' must be a string")
        request.sentences = [line.split() for line in text.split("\n") if line.strip()]
    else:
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens):
            raise ProtocolError("bad_request", "'tokens' must be a list of non-empty strings without whitespace")
        request.tokens = tokens
    count = len(request.words)
    if count == 0:
        raise ProtocolError("empty_text", "there is nothing to score")
    if count > max_tokens:
        raise ProtocolError("too_many_tokens", f"{count} tokens in one message; the limit is {max_tokens}")


def encode(reply: dict) -> bytes:
    return msgpack.packb(reply, use_bin_type=True)


def ok(request_id, **fields) -> dict:
    return {"v": VERSION, "id": request_id, "ok": True, **fields}


def error(request_id, code: str, message: str, **details) -> dict:
    return {"v": VERSION, "id": request_id, "ok": False, "error": {"code": code, "message": message, **details}}
