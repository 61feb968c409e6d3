"""Prometheus metrics of the daemon: one prefix, base units, bounded labels (domain, op, outcome).

Perplexity over any window is computed by Prometheus from two counters:
    exp(rate(rnnlm_loss_nats_total[5m]) / rate(rnnlm_tokens_total[5m]))
With a mixture configured, rnnlm_loss_nats_total is the mixture's (what the daemon answers) and
rnnlm_rnn_loss_nats_total the primary RNN's alone on the same tokens; the gap between the two
windowed perplexities is what the mixture buys.
The running-perplexity gauge is for display.
"""

from __future__ import annotations

import platform
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from importlib import metadata

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, disable_created_metrics)
from prometheus_client.exposition import MetricsHandler

from .protocol import LIMITS, OPS

PREFIX = "rnnlm"
# Scoring a ~20-word message takes about a millisecond; buckets resolve 50 µs to 1 s.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Tokens per score message: a word, a sentence, a paragraph, up to the --max-tokens default.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
HANDSHAKE_REASONS = ("auth", "protocol", "other")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def label_value(value) -> str:
    """Label values as Prometheus users expect them: booleans as true/false, the rest as text."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class Metrics:
    def __init__(self):
        # Every counter would get a *_created twin holding its start time: noise on every
        # dashboard, and process_start_time_seconds says the same once.
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.loss = Counter(f"{PREFIX}_loss_nats", "Cumulative log-loss -ln P of scored tokens, in nats.", ["domain"], registry=r)
        self.rnn_loss = Counter(f"{PREFIX}_rnn_loss_nats", "With a mixture (--ngram, --extra-model): -ln P of the same "
                                "tokens under the primary RNN alone, in nats (rnnlm_loss_nats_total is the mixture's).",
                                ["domain"], registry=r)
        self.tokens = Counter(f"{PREFIX}_tokens", "Tokens scored (sentence ends included).", ["domain"], registry=r)
        self.oov = Counter(f"{PREFIX}_oov_tokens", "Scored tokens never seen in training (OOV).", ["domain"], registry=r)
        self.rare = Counter(f"{PREFIX}_rare_tokens", "Scored tokens that were rare training words (eq. 7).", ["domain"], registry=r)
        self.perplexity = Gauge(f"{PREFIX}_perplexity", "Running perplexity since the domain was created.", ["domain"], registry=r)
        self.updates = Counter(f"{PREFIX}_updates", "SGD updates by outcome (applied, or skipped on a non-finite loss).",
                               ["domain", "outcome"], registry=r)
        self.messages = Counter(f"{PREFIX}_messages", "Messages handled, by op and outcome (ok or an error code).",
                                ["socket", "op", "outcome"], registry=r)
        self.duration = Histogram(f"{PREFIX}_message_duration_seconds",
                                  "Time to handle one message (scored in one call with others of its stream: "
                                  "its share by tokens).", ["op"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.step_calls = Counter(f"{PREFIX}_step_calls", "Calls into the online step for score messages: fewer than "
                                  "those messages when consecutive ones of a stream share a call.", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Messages received and waiting to be handled.", registry=r)
        self.streams = Gauge(f"{PREFIX}_streams_active", "Streams holding hidden state.", registry=r)
        self.evicted = Counter(f"{PREFIX}_streams_evicted", "Streams dropped to bound memory, by reason (lru, idle).",
                               ["reason"], registry=r)
        self.domains = Gauge(f"{PREFIX}_domains_active", "Domains with their own adapted weights.", registry=r)
        self.domains_expired = Counter(f"{PREFIX}_domains_expired", "Domains dropped after --domain-idle-seconds "
                                       "without a message (checkpointed first).", registry=r)
        self.checkpoints = Counter(f"{PREFIX}_checkpoints", "Checkpoint writes, by outcome (ok, failed: e.g. disk "
                                   "full; retried with a growing pause).", ["outcome"], registry=r)
        self.last_checkpoint = Gauge(f"{PREFIX}_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint.", registry=r)
        self.checkpoint_age = Gauge(f"{PREFIX}_checkpoint_age_seconds", "Seconds since the last checkpoint (or since start).", registry=r)
        self.info = Info(f"{PREFIX}_model", "The model being served.", registry=r)
        self.build = Info(f"{PREFIX}_build", "Versions of rnnlm and of what it runs on.", registry=r)
        self.build.info({"version": _version("rnnlm"), "python": platform.python_version(),
                         "torch": _version("torch"), "numba": _version("numba")})
        self.message_tokens = Histogram(f"{PREFIX}_message_tokens", "Tokens per score message.",
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time from taking a message off its socket "
                                    "to starting to handle it (waiting behind the messages taken before it).",
                                    buckets=LATENCY_BUCKETS, registry=r)
        # Learner threads (workers.py): an unbalanced assignment shows as one worker busy and queued
        self.worker_queue_depth = Gauge(f"{PREFIX}_worker_queue_depth", "Messages handed to a learner thread and "
                                        "not answered yet, per worker.", ["worker"], registry=r)
        self.worker_busy = Counter(f"{PREFIX}_worker_busy_seconds", "Seconds a learner thread spent scoring, per "
                                   "worker (a rate near 1: that worker is saturated).", ["worker"], registry=r)
        self.worker_domains = Gauge(f"{PREFIX}_worker_domains", "Domains assigned to a learner thread, per worker.",
                                    ["worker"], registry=r)
        self.domains_seen: set[str] = set()
        self._last_checkpoint_time = time.time()
        self._children: dict = {}
        self.checkpoint_age.set_function(lambda: time.time() - self._last_checkpoint_time)
        for outcome in ("ok", "failed"):
            self.checkpoints.labels(outcome)
        # Trust: limits, authentication, the base model's shadow and the adaptation guard.
        self.limits = Counter(f"{PREFIX}_limits_hit", "Times a configured bound was hit, by limit "
                              "(message_bytes, tokens, streams, domains, pending).", ["limit"], registry=r)
        for limit in LIMITS:
            self.limits.labels(limit)
        self.handshake_failures = Counter(f"{PREFIX}_handshake_failures", "Connections refused during the CURVE "
                                          "handshake, by socket and reason (auth: key not authorised; protocol: "
                                          "e.g. a plaintext client; other).", ["socket", "reason"], registry=r)
        self.base_loss = Counter(f"{PREFIX}_base_loss_nats", "-Σ ln P of the base (unadapted) model on the shadow's "
                                 "sample of traffic, in nats.", ["domain"], registry=r)
        self.base_tokens = Counter(f"{PREFIX}_base_tokens", "Tokens the base model's shadow scored.", ["domain"], registry=r)
        self.sampled_loss = Counter(f"{PREFIX}_sampled_loss_nats", "-Σ ln P of the adapted model on the same sample, "
                                    "in nats.", ["domain"], registry=r)
        self.sampled_tokens = Counter(f"{PREFIX}_sampled_tokens", "Tokens in the shadow's sample (adapted side).",
                                      ["domain"], registry=r)
        self.rollbacks = Counter(f"{PREFIX}_rollbacks", "Domains rolled back by the adaptation guard.", ["domain"], registry=r)
        # a fleet (fleet.py, handoff.py)
        self.fleet_members = Gauge(f"{PREFIX}_fleet_members", "Members named in the fleet file in force.", registry=r)
        self.fleet_owned = Gauge(f"{PREFIX}_fleet_owned_domains", "Domains this member owns and holds.", registry=r)
        self.fleet_info = Gauge(f"{PREFIX}_fleet_info", "1, labelled with this member's name and the fleet "
                                "generation (a hash of the member names) in force.", ["member", "generation"], registry=r)
        self.handoffs = Counter(f"{PREFIX}_handoffs", "Domains handed over: given away, taken from a handoff file, or "
                                "recovered from the last checkpoint of a member that left without handing over.",
                                ["direction"], registry=r)
        self.handoff_wait = Histogram(f"{PREFIX}_handoff_wait_seconds", "How long a message of a domain moving to "
                                      "this member waited for the domain's state.",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.awaiting_handoff = Gauge(f"{PREFIX}_fleet_awaiting_handoff", "1 while a fleet change is not settled: "
                                      "messages of domains this member lacks wait.", registry=r)

    def model_info(self, fields: dict) -> None:
        self.info.info({k: label_value(v) for k, v in fields.items()})

    def start(self, sockets: tuple[str, ...], curve: bool) -> None:
        """Create at 0 the series a daemon will have, so rate() says 0, not "no data", until they move."""
        for socket_name in sockets:
            for op in (OPS if socket_name == "router" else ("score",)):
                self.child(self.messages, socket_name, op, "ok")
            if curve:
                for reason in HANDSHAKE_REASONS:
                    self.handshake_failures.labels(socket_name, reason)

    def domain_seen(self, domain: str, shadowed: bool, mixture: bool) -> None:
        """Create a domain's series at 0 the first time it is seen (a new domain, or one restored)."""
        if domain in self.domains_seen:
            return
        self.domains_seen.add(domain)
        per_domain = [self.loss, self.tokens, self.oov, self.rare, self.rollbacks]
        per_domain += [self.sampled_loss, self.sampled_tokens, self.base_loss, self.base_tokens] if shadowed else []
        per_domain += [self.rnn_loss] if mixture else []
        for metric in per_domain:
            self.child(metric, domain)
        for outcome in ("applied", "skipped"):
            self.child(self.updates, domain, outcome)

    def domain_gone(self, domain: str) -> None:
        """Remove a domain's series: it was handed to another member of the fleet, whose series
        for it are then the only ones (sums over the fleet do not count it twice)."""
        self.domains_seen.discard(domain)
        per_domain = {id(m): m for m in self.per_domain_metrics()}
        for metric_id, labels in list(self._children):
            if metric_id in per_domain and labels[:1] == (domain,):
                per_domain[metric_id].remove(*labels)
                del self._children[(metric_id, labels)]

    def per_domain_metrics(self) -> list:
        return [self.loss, self.rnn_loss, self.tokens, self.oov, self.rare, self.perplexity, self.updates,
                self.base_loss, self.base_tokens, self.sampled_loss, self.sampled_tokens, self.rollbacks]

    def fleet(self, member: str, generation: str, members: int) -> None:
        self.fleet_info.clear()
        self.fleet_info.labels(member, generation).set(1)
        self.fleet_members.set(members)

    def child(self, metric, *labels):
        """`metric.labels(*labels)`, remembered: labels() takes a lock and validates every call,
        a noticeable cost at thousands of messages a second. Label values are bounded, so is this."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def checkpointed(self, ok: bool) -> None:
        self.checkpoints.labels("ok" if ok else "failed").inc()
        if ok:
            self._last_checkpoint_time = time.time()
            self.last_checkpoint.set(self._last_checkpoint_time)

    def serve(self, addr: str):
        """Start the /metrics HTTP endpoint on host:port (port 0 picks one); returns the server."""
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--metrics-addr must be HOST:PORT, got {addr!r}")
        try:
            server = BoundedHTTPServer((host.strip("[]"), int(port)), MetricsHandler.factory(self.registry))
        except OSError as err:  # `rnnlm serve` tries the address first; this is for a race, or another caller
            raise ValueError(f"--metrics-addr {addr!r}: cannot listen there: {err.strerror or err}") from None
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server


HTTP_CONNECTIONS = 8  # connections served at once; more are closed at once
HTTP_TIMEOUT_SECONDS = 5.0  # a connection that sends nothing (or stops reading) for this long is closed


class BoundedHTTPServer(ThreadingHTTPServer):
    """The /metrics endpoint with a thread per connection, but at most HTTP_CONNECTIONS of them,
    each given HTTP_TIMEOUT_SECONDS between bytes: half-open or slow connections cannot pile up
    threads, and once they time out a scrape gets through again."""

    daemon_threads = True

    def __init__(self, address, handler):
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        handler.timeout = HTTP_TIMEOUT_SECONDS  # StreamRequestHandler puts it on the socket
        self.slots = threading.BoundedSemaphore(HTTP_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed, the client may try again
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
