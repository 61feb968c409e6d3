"""Who owns which domain in a fleet of daemons: the members, and rendezvous hashing over them.

A fleet is a list of members, each a name and the endpoint its clients connect to. Every domain
has exactly one owner: the member with the highest weight hash(member, domain) (rendezvous, or
highest-random-weight, hashing). Every member and every client computes the same owner from the
same list, with no coordination, and a change of the list moves only the domains it must: a member
that joins takes about 1/N of the domains, each from the member that held it, and a member that
leaves gives away only its own domains.

The list lives in a fleet file, one member per line:

    # name   endpoint
    rnnlm-0  tcp://rnnlm-0.rnnlm:5555
    rnnlm-1  tcp://rnnlm-1.rnnlm:5555

Blank lines and text after `#` are ignored. Names are unique and are what the hash uses, so a
member keeps its domains when its address changes (a StatefulSet pod keeps its name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import zmq

__all__ = ["Fleet", "FleetError", "Member", "moved_domains", "weight"]


class FleetError(ValueError):
    """The fleet file cannot be used; the message says which line and why."""


@dataclass(frozen=True)
class Member:
    name: str
    endpoint: str


def weight(member: str, domain: str) -> int:
    """The rendezvous weight of `member` for `domain`: 64 bits of BLAKE2b, the same in every process
    and on every machine (Python's own hash() is salted per process)."""
    key = member.encode() + b"\0" + domain.encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Fleet:
    members: tuple[Member, ...]

    def __post_init__(self):
        if not self.members:
            raise FleetError("a fleet needs at least one member")
        names = [m.name for m in self.members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise FleetError(f"member name(s) given twice: {', '.join(twice)}")

    @classmethod
    def parse(cls, text: str, where: str = "fleet file") -> "Fleet":
        members = []
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2:
                raise FleetError(f"{where}, line {number}: expected 'NAME ENDPOINT', got {line.strip()!r}")
            name, endpoint = fields
            if "://" not in endpoint:
                raise FleetError(f"{where}, line {number}: {endpoint!r} is not an endpoint such as "
                                 "tcp://rnnlm-0.rnnlm:5555")
            members.append(Member(name, endpoint))
        try:
            return cls(tuple(members))
        except FleetError as err:
            raise FleetError(f"{where}: {err}") from None

    @classmethod
    def read(cls, path: str | Path) -> "Fleet":
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise FleetError(f"cannot read the fleet file {path}: {err}") from None
        return cls.parse(text, str(path))

    def owner(self, domain: str) -> Member:
        """The member that owns `domain`: the highest weight (ties, which 64 bits make all but
        impossible, go to the smaller name so that every process agrees)."""
        return min(self.members, key=lambda m: (-weight(m.name, domain), m.name))

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    def names(self) -> list[str]:
        return [m.name for m in self.members]


def moved_domains(before: Fleet, after: Fleet, domains) -> dict[str, tuple[str, str]]:
    """The domains whose owner differs between two fleets: domain -> (old owner, new owner)."""
    moves = {}
    for domain in domains:
        old, new = before.owner(domain).name, after.owner(domain).name
        if old != new:
            moves[domain] = (old, new)
    return moves


class Forwarder:
    """Fire-and-forget messages for a domain another member owns, sent on to that member.

    A PULL message has no reply to carry `moved`, so the member that gets one passes its frame on,
    unchanged, as a request to the owner's endpoint (one DEALER per owner, so a sender's messages
    arrive in the order sent); the owner's replies are read and dropped. With CURVE, members have
    no client keys for each other: nothing is forwarded and such messages are counted `moved`."""

    HIGH_WATER = 10_000  # messages queued toward one owner before more are refused (counted `moved`)

    def __init__(self, ctx):
        self.ctx = ctx
        self.sockets: dict[str, zmq.Socket] = {}

    def send(self, endpoint: str, frame: bytes) -> bool:
        socket = self.sockets.get(endpoint)
        if socket is None:
            socket = self.sockets[endpoint] = self.ctx.socket(zmq.DEALER)
            socket.setsockopt(zmq.SNDHWM, self.HIGH_WATER)
            socket.setsockopt(zmq.LINGER, 2000)  # what is queued at shutdown gets a moment to leave
            socket.connect(endpoint)
        try:
            socket.send(frame, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # the queue toward that member is full
            return False

    def drain(self) -> None:
        """Read and drop the owners' replies, so they do not pile up."""
        for socket in self.sockets.values():
            while True:
                try:
                    socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break

    def close(self) -> None:
        for socket in self.sockets.values():
            socket.close()
