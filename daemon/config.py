"""The daemon's settings: every default and every check of how they go together, in one place.

`rnnlm serve`'s options map onto these fields one to one (their defaults are read from here);
`--max-pending` is `max_in_hand`. The Server reads nothing else.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    model: str | None = None  # None: the bundled default model
    bind: str = "tcp://127.0.0.1:5555"
    pull_bind: str | None = None  # fire-and-forget ingestion (score with no reply)
    metrics_addr: str = "127.0.0.1:9109"
    state_dir: str | None = None
    port_file: str | None = None
    lr: float = 0.01
    learn: bool = True
    checkpoint_tokens: int = 100_000
    checkpoint_seconds: float = 300.0
    keep_checkpoints: int = 3
    max_streams: int = 10_000
    max_domains: int = 16
    stream_idle_seconds: float = 3600.0
    max_tokens: int = 10_000  # per message
    max_message_bytes: int = 1 << 20  # larger: message_too_large; over twice this (ZMQ_MAXMSGSIZE) drops the peer
    max_in_hand: int = 1_000  # messages drained from the sockets before handling (--max-pending)
    curve_secret_key: str | None = None  # the daemon's NAME.key_secret: CURVE on both sockets
    curve_authorized_dir: str | None = None  # public keys of the clients let in (ZAP)
    curve_admin_dir: str | None = None  # public keys allowed the control ops (save, reset, drop_domain)
    max_domains_per_key: int | None = None  # with CURVE: domains one client key may create
    domain_idle_seconds: float = 0.0  # drop a domain after this long without a message (0: never)
    max_memory_mb: float | None = None  # refuse new domains, cap streams, to stay within this
    decay_to_base: float = 0.0  # adaptation guard (guard.py): all off by default
    shadow_sample: float = 0.0
    guard_margin: float | None = None
    guard_window: int = 2000
    extra_models: tuple[str, ...] = ()  # extra RNNs in every score (combination.py), adapting like the primary
    ngram: str | None = None  # an ARPA model in every score
    weights: tuple[float, ...] | None = None  # primary, extras, n-gram; None: the n-gram 0.25, the RNNs share the rest
    tune_on: str | None = None  # a validation text: the weights are tuned on it by EM at start (as `rnnlm eval`)
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))  # learner threads; default: the cores
    fleet: str | None = None  # a fleet file (daemon/fleet.py): serve the domains this member owns, redirect the rest
    fleet_name: str = field(default_factory=socket.gethostname)  # this member's name in it (a pod's name)
    fleet_store: str | None = None  # a directory every member mounts: their checkpoints, domains handed over (handoff.py)
    handoff_wait_seconds: float = 30.0  # for a member that left the fleet to hand over, before recovering its domains

    def check(self) -> None:
        """ValueError naming the options that do not go together."""
        if (self.curve_secret_key is None) != (self.curve_authorized_dir is None):
            raise ValueError("--curve-secret-key and --curve-authorized-dir go together")
        if self.curve_secret_key is None and (self.curve_admin_dir or self.max_domains_per_key):
            raise ValueError("--curve-admin-dir and --max-domains-per-key tell clients apart by their CURVE keys: "
                             "give --curve-secret-key and --curve-authorized-dir too")
        if self.guard_margin is not None and not self.shadow_sample:
            raise ValueError("--guard-margin compares against the base model's shadow: give --shadow-sample too")
        if self.fleet is not None and (not self.fleet_name or any(c.isspace() for c in self.fleet_name)):
            raise ValueError(f"--fleet-name {self.fleet_name!r}: a member's name is one word, as in the fleet file")
        if self.fleet_store is not None and self.fleet is None:
            raise ValueError("--fleet-store holds the state of a fleet's members: give --fleet too")
        if self.fleet_store is not None and self.state_dir is not None:
            raise ValueError("--fleet-store and --state-dir: in a fleet each member's checkpoints are in "
                             "FLEET_STORE/NAME, where the other members find them; drop --state-dir")
        if self.handoff_wait_seconds < 0:
            raise ValueError(f"--handoff-wait {self.handoff_wait_seconds:g}: a number of seconds, 0 or more")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: at least one learner thread")

    @property
    def state_directory(self) -> str | None:
        """Where this daemon's checkpoints go: --state-dir, or in a fleet store its member's folder."""
        if self.fleet_store is not None:
            return str(member_state_dir(self.fleet_store, self.fleet_name))
        return self.state_dir


def member_state_dir(fleet_store: str | os.PathLike, member: str) -> Path:
    """Where a fleet member keeps its checkpoints, for itself and for the others (handoff.py)."""
    return Path(fleet_store) / member
