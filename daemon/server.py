"""The long-running process: startup → main loop → shutdown, signals handled in one place.

The main thread owns the sockets. Messages are drained from them into an in-hand queue (its
length is the queue-depth metric) and handed, in arrival order, to the learner threads
(workers.py): each domain belongs to one worker, which applies its messages in order, so domains
learn in parallel while every reply stays what the single-learner daemon gives. Consecutive score
messages of one stream go through the online step in one call, each still answered on its own.
Every other op (save, stats, reset, ...) waits until the messages before it are answered and is
handled by the main thread, as is every checkpoint's snapshot: the learner is then between
messages on every worker. SIGTERM or SIGINT stops the intake; what is in hand is answered, a
checkpoint is written, and the process exits 0.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from rnnlm.atomic import write_text_atomic
from rnnlm.bundled import DEFAULT_MODEL
from rnnlm.checkpoint import CheckpointError, load_model
from rnnlm.corpus import read_tokens
from rnnlm.mixture import Mixture, NGramComponent, RNNComponent, default_weights
from rnnlm.model import OnlineRule

from . import protocol
from . import systemd
from .auth import CurveServer
from .config import ServeConfig
from .fleet import Fleet, Forwarder
from .fleet_member import FleetMember, fleet_file_text, same_model
from .handoff import Handoffs, model_fingerprint
from .combination import Combination, Parts, describe_components, same_components, saved_fingerprints
from .guard import AdaptConfig
from .learner import Learner, MemoryBudget, NoRoom, token_flags
from .metrics import Metrics
from .protocol import ProtocolError
from .state import CheckpointWriteError, StateStore
from .workers import Workers

log = logging.getLogger("rnnlm.daemon")

RUN_TOKENS = 1024  # most tokens scored in one call for consecutive messages of a stream (bounds their latency)
# Most seconds of handling per turn of the main loop: between turns the watchdog is pinged, the
# sockets are read and pings answered, whatever the backlog (a message or run can overrun it by
# its own time, bounded by --max-tokens and RUN_TOKENS).
TURN_SECONDS = 0.25
# A worker inside one run for longer than this is taken for wedged: the main loop stops pinging
# systemd's watchdog, which then restarts the daemon (a run is bounded by RUN_TOKENS or --max-tokens).
WORKER_STUCK_SECONDS = 10.0
LOOKAHEAD = 64  # messages looked through for more of a run's stream, past other domains' messages
GIL_SWITCH_SECONDS = 0.0005
NO_DOMAIN = "_none"  # the domain label of `learn: false` scores against a domain that does not exist


@dataclass
class Message:
    """One message taken from a socket, parsed (or refused) and waiting for its answer."""

    envelope: list[bytes]  # the frames that route the reply (ROUTER's identity, a REQ's empty delimiter)
    fire_and_forget: bool  # from the PULL socket: handled and counted, never answered
    start: float  # when parsing began
    op: str = "invalid"
    rid: object = None
    request: protocol.Request | None = None
    failure: tuple[dict, str] | None = None  # the error reply and its code, when it could not be parsed
    parsed: float = 0.0  # seconds spent parsing
    user: str | None = None  # with CURVE: the client's public key (Z85)
    outcome: tuple[dict, str, float] | None = None  # reply, outcome, seconds: ready, waiting for its turn
    waiting_since: float | None = None  # when it began waiting for its domain to be handed over (fleets)

    @property
    def peer(self) -> bytes | None:
        """The ROUTER identity of the connection it came on (None for PULL)."""
        return None if self.fire_and_forget else self.envelope[0]


class Server(FleetMember):
    def __init__(self, config: ServeConfig):
        self.config = config
        self.should_exit = False
        self.reload_requested = False
        self.metrics = Metrics()
        self.in_hand: deque[Message] = deque()
        self.in_hand_of: Counter = Counter()  # messages in hand per ROUTER connection
        # Per ROUTER connection, its messages not answered yet, in arrival order: replies leave in
        # that order, though workers finish other domains' messages sooner or later.
        self.unanswered: dict[bytes, deque[Message]] = {}
        self.tokens_since_checkpoint = 0
        self.tokens_in_flight = 0  # of score messages handed to the workers and not answered yet
        self.sweep_due = False  # idle streams and domains are looked for once the workers are between messages
        self.changed_since_checkpoint = False  # anything a checkpoint holds changed (tokens, resets)
        self.last_checkpoint = time.monotonic()
        self.lru_evictions_reported = 0
        self.exit_code = 0
        self.curve: CurveServer | None = None
        self.watchdog = systemd.Watchdog()  # WatchdogSec=: a wedged loop gets restarted
        state_dir = config.state_directory
        self.state = StateStore(state_dir, config.keep_checkpoints, self.metrics.checkpointed) if state_dir else None
        self.fleet = Fleet.read(config.fleet) if config.fleet else None  # a bad file stops the start here
        self.fleet_text = fleet_file_text(config.fleet)
        self.next_fleet_look = 0.0  # when to look at the fleet file and the handoff folder again
        self.handoffs = (Handoffs(config.fleet_store, config.fleet_name, config.handoff_wait_seconds)
                         if config.fleet_store else None)
        self.giving: set[str] = set()  # domains to hand over once no message of theirs is in hand or in flight

    @property
    def checkpoint_seq(self) -> int:
        return self.state.seq if self.state is not None else 0

    # --- lifecycle -------------------------------------------------------------------------------

    def run(self) -> int:
        self.startup()
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return self.exit_code

    def startup(self) -> None:
        cfg = self.config
        # A learner thread back from the compiled step (which runs without the GIL) waits for the
        # thread holding it to give it up, up to the switch interval: 5 ms by default, which
        # showed in the replies' p99 with several workers (docs/benchmarks.md).
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        return_big_blocks_to_the_system()
        self.learner = self.load_learner()
        self.learner.warm_up()
        self.set_memory_budget()
        # Everything loaded so far (torch, numba, the model) lives as long as the process: kept out
        # of the collector's full passes, which otherwise walk it all and pause the loop for
        # hundreds of milliseconds whenever enough new objects (a snapshot's) have piled up.
        gc.freeze()
        if self.fleet is not None:
            self.warn_if_not_a_member()
        if self.handoffs is not None:
            self.handoffs.base = model_fingerprint(self.learner.model)
            self.fleet_changed(None)
        model = self.learner.model
        components = self.components()
        self.metrics.model_info({
            **model.describe(), "lr": cfg.lr, "learning": cfg.learn,
            "components": ", ".join(f"{c['name']} ({c['kind']})" for c in components),
            "weights": ",".join(f"{c['weight']:.6g}" for c in components)})
        self.metrics.start(("router", "pull") if cfg.pull_bind else ("router",), curve=bool(cfg.curve_secret_key))
        for domain in {protocol.DEFAULT_DOMAIN, *self.learner.domains}:
            self.note_domain(domain)
        self.ctx = zmq.Context()
        self.forwarder = Forwarder(self.ctx)
        self.workers = Workers(cfg.workers, self.ctx, self.score_messages, self.metrics)
        self.curve = (CurveServer(self.ctx, cfg.curve_secret_key, cfg.curve_authorized_dir, self.metrics.handshake_failures,
                                  cfg.curve_admin_dir)
                      if cfg.curve_secret_key else None)
        self.router = self.bind(zmq.ROUTER, cfg.bind)
        self.pull = self.bind(zmq.PULL, cfg.pull_bind) if cfg.pull_bind else None
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.pull is not None:
            self.poller.register(self.pull, zmq.POLLIN)
        self.poller.register(self.workers.wake, zmq.POLLIN)
        self.http = self.metrics.serve(cfg.metrics_addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_exit)
        signal.signal(signal.SIGHUP, self.handle_reload)
        endpoints = {
            "endpoint": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            "pull_endpoint": self.pull.getsockopt_string(zmq.LAST_ENDPOINT) if self.pull else None,
            "metrics": f"http://{cfg.metrics_addr.rpartition(':')[0]}:{self.http.server_port}/metrics",
            "pid": os.getpid(),
        }
        if cfg.port_file:
            write_text_atomic(cfg.port_file, json.dumps(endpoints) + "\n")
        self.update_gauges()
        log.info("ready: %s; metrics %s; model %s (%s)", endpoints["endpoint"], endpoints["metrics"],
                 cfg.model or "bundled default", ", ".join(f"{k} {v}" for k, v in model.describe().items()))
        systemd.notify("READY=1")  # Type=notify: the model is loaded and every socket is bound

    def set_memory_budget(self) -> None:
        """--max-memory-mb: the process as loaded, plus what the in-hand queue may hold, is fixed;
        what is left goes to domains and streams at their worst-case costs."""
        cfg = self.config
        if cfg.max_memory_mb is None:
            return
        per_domain, per_stream = MemoryBudget.costs(self.learner)
        in_hand = cfg.max_in_hand * cfg.max_message_bytes
        fixed = rss_bytes() + in_hand - (len(self.learner.domains) * per_domain + len(self.learner.streams) * per_stream)
        budget = MemoryBudget(cfg.max_memory_mb, fixed, per_domain, per_stream)
        if not budget.room_for(max(len(self.learner.domains), 1), len(self.learner.streams)):
            raise ValueError(f"--max-memory-mb {cfg.max_memory_mb:g} leaves no room for a domain: "
                             f"{budget.describe()}, {in_hand / 2 ** 20:.0f} MB for messages in hand")
        self.learner.budget = budget
        log.info("memory budget %g MB: %s, %.0f MB for messages in hand", cfg.max_memory_mb, budget.describe(),
                 in_hand / 2 ** 20)

    def bind(self, kind: int, endpoint: str) -> zmq.Socket:
        socket = self.ctx.socket(kind)
        socket.setsockopt(zmq.LINGER, 2000)  # give replies in flight a moment at shutdown
        # Frames up to twice the limit are answered with message_too_large (and counted); bigger
        # ones make ZeroMQ drop the peer before they are ever buffered whole.
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.hard_frame_limit(self.config.max_message_bytes))
        if self.curve is not None:
            self.curve.secure(socket, "router" if kind == zmq.ROUTER else "pull")
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as err:
            socket.close(0)
            raise ValueError(f"cannot bind {endpoint}: {err}") from None
        return socket

    def handle_exit(self, signum, frame) -> None:
        log.info("received %s: finishing what is in hand", signal.Signals(signum).name)
        self.should_exit = True

    def handle_reload(self, signum, frame) -> None:
        self.reload_requested = True  # acted on in the main loop, not inside the signal handler

    def reload(self) -> None:
        self.reload_requested = False
        if self.fleet is not None:
            self.reload_fleet()
        if self.curve is None:
            if self.fleet is None:
                log.info("received SIGHUP: nothing to reload (CURVE is off, no --fleet)")
            return
        try:
            self.curve.reload()
        except Exception as err:  # a bad key directory keeps the keys in force
            log.error("received SIGHUP: could not reload the client keys, keeping the ones in force: %s", err)

    def main_loop(self) -> None:
        cfg = self.config
        # idle streams and domains are looked for every 10 s, or more often for shorter idle limits
        sweep_every = min(10.0, cfg.stream_idle_seconds / 2, (cfg.domain_idle_seconds or 20.0) / 2)
        next_sweep = time.monotonic() + sweep_every
        while not self.should_exit:
            self.ping_watchdog()
            if self.reload_requested:
                self.reload()
            # with nothing in flight, whatever is in hand can go now; else a worker's answer wakes the poll
            self.poller.poll(0 if self.in_hand and not self.workers.runs_in_flight else 100)
            self.receive()
            self.collect()
            self.maybe_checkpoint()
            if self.fleet is not None:
                self.forwarder.drain()
                self.fleet_turn()
            if time.monotonic() >= next_sweep:
                self.sweep_due = True
            if self.sweep_due and not self.workers.runs_in_flight:
                self.sweep()
                next_sweep = time.monotonic() + sweep_every
            self.handle_in_hand(TURN_SECONDS)
            self.update_gauges()

    def sweep(self) -> None:
        self.sweep_due = False
        self.metrics.evicted.labels("idle").inc(self.learner.expire_idle())
        self.expire_domains()

    def ping_watchdog(self) -> None:
        """A wedged worker must get the daemon restarted as a wedged main loop does: no ping then."""
        if not self.workers.stuck(WORKER_STUCK_SECONDS):
            self.watchdog.ping()

    def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        # Answer what has already arrived, then stop.
        self.receive()
        handoff_deadline = time.monotonic() + self.config.handoff_wait_seconds
        while self.in_hand or self.workers.runs_in_flight:
            self.handle_in_hand(TURN_SECONDS)
            if self.workers.runs_in_flight:
                self.workers.wait(TURN_SECONDS)
            self.collect()
            self.ping_watchdog()
            if self.handoffs is not None and self.in_hand:  # messages waiting for a domain to be handed over
                self.fleet_turn()
                if not self.workers.runs_in_flight and time.monotonic() > handoff_deadline:
                    self.refuse_in_hand()
                time.sleep(0.01)
        self.workers.stop()
        try:
            if self.handoffs is not None:
                self.leave_fleet()
            if self.state is not None:
                self.write_checkpoint("shutdown")
        except CheckpointWriteError:
            self.exit_code = 1  # the state since the last checkpoint is lost; the log said why
        finally:
            if self.curve is not None:
                self.curve.stop()
            self.router.close()
            if self.pull is not None:
                self.pull.close()
            self.forwarder.close()
            self.ctx.term()
            self.http.shutdown()
            log.info("stopped")

    # --- messages ------------------------------------------------------------------------------

    def receive(self) -> None:
        """Take what has arrived into the in-hand queue: one message from each socket in turn, so a
        backlog on one cannot starve the other, until the queue holds --max-pending messages.

        A ping whose connection has nothing else in hand is answered at once: its reply cannot
        overtake one of that connection's, and a liveness probe gets it whatever the backlog."""
        sockets = [s for s in (self.router, self.pull) if s is not None]
        reads = 0
        deadline = time.perf_counter() + TURN_SECONDS  # parsing 1,000 big messages takes seconds too
        while (sockets and len(self.in_hand) < self.config.max_in_hand and reads < 4 * self.config.max_in_hand
               and time.perf_counter() < deadline):
            for socket in list(sockets):
                received = protocol.read_message(socket)
                if received is None:
                    sockets.remove(socket)
                    continue
                reads += 1
                message = self.parse(socket, received)
                if message.op == "ping" and message.failure is None and not self.in_hand_of[message.peer]:
                    self.answer(message, self.op_ping(message.request), "ok", message.parsed)
                    continue
                self.in_hand.append(message)
                self.in_hand_of[message.peer] += 1
                if not message.fire_and_forget:
                    self.unanswered.setdefault(message.peer, deque()).append(message)
        if len(self.in_hand) >= self.config.max_in_hand and any(
                s is not None and s.getsockopt(zmq.EVENTS) & zmq.POLLIN for s in (self.router, self.pull)):
            self.metrics.limits.labels("pending").inc()  # the rest waits in ZeroMQ's queue (RCVHWM)
        self.metrics.queue_depth.set(len(self.in_hand))

    def handle_in_hand(self, budget: float) -> None:
        """Hand the messages in hand to the workers, or handle them here, in arrival order, for
        about `budget` seconds; what cannot go yet waits for the next turn.

        A score message goes to its domain's worker, with the messages of its stream right behind
        it (see `take_run`), unless that worker has its fill or an earlier message of the domain is
        still waiting: then it waits too, and later messages of other domains go past it. Any other
        message waits until everything before it is answered, and is handled here. A checkpoint
        that falls due stops the handing-over until every worker is between messages."""
        deadline = time.perf_counter() + budget
        workers = self.workers
        waiting: deque[Message] = deque()  # taken off in_hand and put back in front, in order
        held: set[str] = set()  # domains with a message waiting: their later messages wait too
        while self.in_hand and time.perf_counter() < deadline:
            if workers.runs_in_flight and (self.sweep_due or self.checkpoint_wanted(self.tokens_in_flight)):
                break  # the snapshot or the sweep needs every worker between messages
            if workers.all_full():
                break  # nothing more can go before a worker answers
            message = self.in_hand.popleft()
            if not self.for_workers(message):
                if waiting or workers.runs_in_flight:
                    waiting.append(message)  # answered after every message before it
                    break
                self.handle_here(message)
                continue
            domain = message.request.domain
            if domain in held or not workers.has_room(domain) or self.must_wait(message):
                held.add(domain)
                waiting.append(message)
                continue
            run = self.take_run(message)
            tokens = sum(len(m.request.words) for m in run)
            started = time.perf_counter()
            for m in run:
                self.metrics.queue_wait.observe(started - m.start)
                if m.waiting_since is not None:
                    self.metrics.handoff_wait.observe(started - m.waiting_since)
            self.tokens_in_flight += tokens
            workers.hand(domain, run, tokens)
        self.in_hand.extendleft(reversed(waiting))
        self.metrics.queue_depth.set(len(self.in_hand))

    @staticmethod
    def for_workers(message: Message) -> bool:
        return message.failure is None and message.op == "score"

    def handle_here(self, message: Message) -> None:
        """A control op (or a message that could not be parsed), with every worker between messages."""
        self.metrics.queue_wait.observe(time.perf_counter() - message.start)
        start = time.perf_counter()
        reply, outcome = self.execute(message)
        self.deliver(message, reply, outcome, message.parsed + time.perf_counter() - start)
        self.maybe_checkpoint()
        self.ping_watchdog()

    def deliver(self, message: Message, reply: dict, outcome: str, seconds: float) -> None:
        """Answer a message once every message that came before it on its connection is answered."""
        if message.fire_and_forget:
            self.answer(message, reply, outcome, seconds)
            self.answered(message)
            return
        message.outcome = (reply, outcome, seconds)
        waiting = self.unanswered[message.peer]
        while waiting and waiting[0].outcome is not None:
            ready = waiting.popleft()
            self.answer(ready, *ready.outcome)
            self.answered(ready)
        if not waiting:
            del self.unanswered[message.peer]

    def answered(self, message: Message) -> None:
        self.in_hand_of[message.peer] -= 1
        if not self.in_hand_of[message.peer]:
            del self.in_hand_of[message.peer]

    def collect(self) -> None:
        """Send the replies the workers have finished, in the order each worker finished them."""
        for done in self.workers.collect(keep=lambda domain: domain in self.learner.domains):
            self.tokens_in_flight -= done.tokens_handed
            self.tokens_since_checkpoint += done.tokens_scored
            for message, (reply, outcome, seconds) in zip(done.run, done.answers):
                self.deliver(message, reply, outcome, seconds)

    def take_run(self, head: Message) -> list[Message]:
        """The message, and the score messages of its stream after it that can share its call.

        Messages of other domains in between keep their place; a run stops at a control op, at
        another stream (or `learn`) of the same domain, at RUN_TOKENS, and at the message that
        makes a checkpoint due: checkpoints fall after the same messages as without runs."""
        run = [head]
        first = head.request
        if first.seq is not None or not self.learner.scores_runs:
            return run  # numbered messages go one at a time, each checked against its stream's number
        tokens = len(first.words)
        i = 0
        while (i < min(len(self.in_hand), LOOKAHEAD) and tokens < RUN_TOKENS
               and not self.checkpoint_wanted(self.tokens_in_flight + tokens)):
            message = self.in_hand[i]
            if not self.for_workers(message):
                break
            request = message.request
            if request.domain != first.domain:
                i += 1
                continue
            if request.seq is not None or (request.stream, request.learn) != (first.stream, first.learn):
                break
            n = len(request.words)
            if tokens + n > RUN_TOKENS:
                break
            run.append(message)
            del self.in_hand[i]
            tokens += n
        return run

    def parse(self, socket: zmq.Socket, received: protocol.Received) -> Message:
        from_pull = socket is self.pull
        start = time.perf_counter()
        message = Message(received.frames[:1] if not from_pull else [], from_pull, start, user=received.user)
        frame = b""
        try:
            message.envelope, frame = protocol.split_envelope(received, from_router=not from_pull)
            protocol.check_size(frame, self.config.max_message_bytes)
            decoded = protocol.decode(frame)
            message.rid = protocol.request_id(decoded)
            message.op = decoded.get("op") if decoded.get("op") in protocol.OPS else "unknown"
            message.request = protocol.parse(decoded, self.config.max_tokens)
            if self.fleet is not None and message.op in protocol.DOMAIN_OPS:
                self.check_owner(message.request)
            if message.fire_and_forget and message.op not in protocol.DATA_OPS:
                raise ProtocolError("wrong_socket", f"'{message.op}' is a control op; send it to the request socket")
        except Exception as err:
            message.request = None
            if self.forwarded(message, err, frame):
                message.failure = ({}, "forwarded")  # counted; nothing to answer
            else:
                message.failure = self.failure(message, err)
        message.parsed = time.perf_counter() - start
        return message

    def execute(self, message: Message) -> tuple[dict, str]:
        """The reply to one message, and its outcome for the metrics ("ok" or an error code)."""
        if message.failure is not None:
            return message.failure
        try:
            self.check_allowed(message)
            if message.op in protocol.DOMAIN_OPS and self.must_wait(message):
                raise ProtocolError("handoff", f"domain {protocol.spelled(message.request.domain)} is being handed "
                                               "over to this member; send this again in a moment")
            return getattr(self, f"op_{message.op}")(message.request), "ok"
        except Exception as err:
            return self.failure(message, err)

    def check_allowed(self, message: Message) -> None:
        if message.op in protocol.ADMIN_OPS and self.curve is not None and not self.curve.is_admin(message.user):
            raise ProtocolError("forbidden", f"'{message.op}' is a control op, allowed only to the keys in "
                                             "--curve-admin-dir")

    def score_messages(self, run: list[Message]) -> tuple[list[tuple[dict, str, float]], int]:
        """Score a run of one stream's messages (a worker thread): each message's reply, outcome
        and seconds (its share of the call, by tokens, plus its own parsing), and the tokens scored."""
        start = time.perf_counter()
        try:
            if len(run) == 1:
                replies = [self.op_score(run[0].request, run[0].user)]
            else:
                results = self.learner.score_run([m.request for m in run], run[0].user)
                self.metrics.step_calls.inc()
                replies = [self.score_reply(m.request, r) for m, r in zip(run, results)]
            outcomes = [(reply, "ok") for reply in replies]
        except Exception as err:  # e.g. too_many_domains: each message would have got the same answer
            outcomes = [self.failure(m, err) for m in run]
        tokens = [len(m.request.words) for m in run]
        seconds = time.perf_counter() - start
        scored = sum(n for n, (reply, outcome) in zip(tokens, outcomes) if outcome == "ok" and not reply.get("duplicate"))
        return ([(reply, outcome, m.parsed + seconds * n / max(sum(tokens), 1))
                 for m, (reply, outcome), n in zip(run, outcomes, tokens)], scored)

    def failure(self, message: Message, err: Exception) -> tuple[dict, str]:
        if isinstance(err, NoRoom):  # the learner's bounds, in the protocol's words
            err = ProtocolError(err.code, str(err))
        if isinstance(err, ProtocolError):
            if err.code in protocol.LIMIT_OF_CODE:
                self.metrics.limits.labels(protocol.LIMIT_OF_CODE[err.code]).inc()
            return protocol.error(message.rid, err.code, err.message, **err.details), err.code
        # a bug must not take the daemon down; say so and go on
        log.error("internal error handling %s", message.op, exc_info=err)
        return protocol.error(message.rid, "internal", f"internal error: {type(err).__name__}"), "internal"

    def answer(self, message: Message, reply: dict, outcome: str, seconds: float) -> None:
        m = self.metrics
        m.child(m.messages, "pull" if message.fire_and_forget else "router", message.op, outcome).inc()
        m.child(m.duration, message.op).observe(seconds)
        if not message.fire_and_forget:
            self.router.send_multipart([*message.envelope, protocol.encode(reply)])

    def op_score(self, request: protocol.Request, owner: str | None = None) -> dict:
        stored = self.repeated_reply(request)
        if stored is not None:
            return stored
        result = self.learner.score(request, owner)
        self.metrics.step_calls.inc()
        reply = self.score_reply(request, result)
        stream = self.learner.streams.get((request.domain, request.stream)) if request.seq is not None else None
        if stream is not None:
            stream.seq = request.seq
            stream.seq_reply = protocol.encode({k: v for k, v in reply.items() if k not in ("v", "id", "ok")})
        return reply

    def repeated_reply(self, request: protocol.Request) -> dict | None:
        """Exactly-once retries (docs/protocol.md): a repeat of the stream's last applied `seq` gets
        that message's reply again and is neither scored nor learned from; the next number goes on;
        any other is refused. A stream with no number yet (new, reset or evicted) takes any."""
        stream = self.learner.streams.get((request.domain, request.stream)) if request.seq is not None else None
        if stream is None or stream.seq is None or request.seq == stream.seq + 1:
            return None
        if request.seq == stream.seq:
            return protocol.ok(request.id, **msgpack.unpackb(stream.seq_reply, raw=False), duplicate=True)
        raise ProtocolError("out_of_order", f"seq {request.seq} on stream {protocol.spelled(request.stream)} of domain "
                            f"{protocol.spelled(request.domain)}: expected {stream.seq + 1} (or {stream.seq} again, "
                            "answered with its stored reply)", expected=stream.seq + 1)

    def score_reply(self, request: protocol.Request, result) -> dict:
        """The reply to one scored message, and its metrics."""
        m = self.metrics
        # a `learn: false` score of a domain that does not exist is not one: one label for them all
        d = request.domain if request.domain in self.learner.domains else NO_DOMAIN
        n, loss = len(result.words), -float(result.logprobs.sum())
        mixture = {}
        if result.rnn_logprobs is not None:
            rnn_loss = -float(result.rnn_logprobs.sum())
            m.child(m.rnn_loss, d).inc(rnn_loss)
            mixture = {"rnn_logprobs": result.rnn_logprobs.tolist(), "rnn_loss": rnn_loss}
        oov, rare = token_flags(result.kinds)
        m.child(m.tokens, d).inc(n)
        m.child(m.loss, d).inc(loss)
        m.child(m.oov, d).inc(len(oov))
        m.child(m.rare, d).inc(len(rare))
        m.child(m.perplexity, d).set(result.domain_perplexity)
        self.note_domain(d)
        m.message_tokens.observe(n)
        if result.applied:
            m.child(m.updates, d, "applied").inc(result.applied)
        if result.skipped:
            m.child(m.updates, d, "skipped").inc(result.skipped)
        if result.sample is not None:
            s = result.sample
            m.child(m.rollbacks, d)  # present at 0 for every shadowed domain
            if math.isfinite(s.adapted_loss) and math.isfinite(s.base_loss):
                m.child(m.sampled_loss, d).inc(s.adapted_loss)
                m.child(m.sampled_tokens, d).inc(s.tokens)
                m.child(m.base_loss, d).inc(s.base_loss)
                m.child(m.base_tokens, d).inc(s.tokens)
        if result.rolled_back:
            m.child(m.rollbacks, d).inc()
            log.warning("domain %r rolled back: %s", d, result.rolled_back)
        return protocol.ok(
            request.id,
            logprobs=result.logprobs.tolist(),
            tokens=n,
            oov=oov,
            rare=rare,
            loss=loss,
            stream_perplexity=result.stream_perplexity,
            stream_tokens=result.stream_tokens,
            updates=result.domain_updates,
            learned=result.applied,
            **mixture,
        )

    def note_domain(self, domain: str) -> None:
        cfg = self.config
        self.metrics.domain_seen(domain, shadowed=bool(cfg.shadow_sample), mixture=bool(cfg.extra_models or cfg.ngram))

    def op_reset(self, request: protocol.Request) -> dict:
        existed = self.learner.reset(request.domain, request.stream)
        self.changed_since_checkpoint |= existed
        return protocol.ok(request.id, existed=existed)

    def op_drop_domain(self, request: protocol.Request) -> dict:
        existed = self.learner.drop_domain(request.domain)
        self.workers.unassign(request.domain)
        self.changed_since_checkpoint |= existed
        if existed:
            log.info("domain %r dropped on request", request.domain)
        return protocol.ok(request.id, existed=existed)

    def op_stats(self, request: protocol.Request) -> dict:
        return protocol.ok(request.id, **self.learner.stats(), seconds_since_checkpoint=time.monotonic() - self.last_checkpoint,
                           **self.fleet_info())

    def op_save(self, request: protocol.Request) -> dict:
        if self.state is None:
            raise ProtocolError("no_state_dir", "the daemon runs without --state-dir, so there is nowhere to save")
        try:
            path = self.write_checkpoint("requested")
        except CheckpointWriteError as err:
            raise ProtocolError("checkpoint_failed", f"the checkpoint could not be written ({err}); the older "
                                "checkpoints are kept and the daemon goes on serving") from None
        return protocol.ok(request.id, path=str(path))

    def op_ping(self, request: protocol.Request) -> dict:
        return protocol.ok(request.id, pong=True)

    def op_info(self, request: protocol.Request) -> dict:
        cfg = self.config
        return protocol.ok(request.id, protocol=protocol.VERSION, model=cfg.model or "bundled default",
                           **self.learner.model.describe(), lr=cfg.lr, learning=cfg.learn,
                           max_tokens=cfg.max_tokens, max_message_bytes=cfg.max_message_bytes,
                           eos="</s>", logprob_base="e", components=self.components(), **self.fleet_info())

    def components(self) -> list[dict]:
        """The models in every score: name, kind, weight (the primary RNN alone when not mixing)."""
        if self.learner.combination is None:
            return [{"name": self.config.model or "bundled default", "kind": "rnn", "weight": 1.0}]
        return self.learner.combination.describe()

    def expire_domains(self) -> None:
        """Drop the domains idle for --domain-idle-seconds, after a checkpoint that holds them (none
        is dropped while checkpoints fail: their adaptation would be lost for good)."""
        seconds = self.config.domain_idle_seconds
        idle = self.learner.idle_domains(seconds) if seconds else []
        if not idle:
            return
        if self.state is not None:
            try:
                path = self.write_checkpoint("before expiring idle domains")
            except CheckpointWriteError:
                return
            log.info("expiring %d domain(s) idle for %.0f s: %s (their last state is in %s)",
                     len(idle), seconds, ", ".join(map(repr, idle)), path)
        for name in idle:
            self.learner.drop_domain(name)
            self.workers.unassign(name)
        self.changed_since_checkpoint = True
        self.metrics.domains_expired.inc(len(idle))

    # --- state ---------------------------------------------------------------------------------

    def load_learner(self) -> Learner:
        """Resume from the newest checkpoint that is whole and valid (state.py), else start from the model."""
        cfg = self.config
        rule = OnlineRule(lr=cfg.lr, learn=cfg.learn)
        adapt = AdaptConfig(cfg.decay_to_base, cfg.shadow_sample, cfg.guard_margin, cfg.guard_window)

        parts = None
        primary = None  # the --model (or bundled) model, loaded once for whatever needs it
        if cfg.extra_models or cfg.ngram:
            parts = Parts.load(cfg.extra_models, cfg.ngram, cfg.weights or default_weights(1 + len(cfg.extra_models), bool(cfg.ngram)))
            if cfg.tune_on:
                primary = load_model(cfg.model or DEFAULT_MODEL)
                parts.weights = self.tuned_weights(primary, parts, rule)
            log.info("combining every score with %s", describe_components(parts.fingerprints))
        ours = parts.fingerprints if parts is not None else []

        def new_learner(model) -> Learner:
            combination = Combination(model, cfg.model or "bundled default", parts) if parts is not None else None
            return Learner(model, rule, cfg.max_streams, cfg.max_domains, cfg.stream_idle_seconds, adapt, combination,
                           cfg.max_domains_per_key)

        if cfg.model is not None and self.state is not None and self.state.files():
            primary = primary or load_model(cfg.model)
        given = primary if cfg.model is not None else None

        def accept(payload: dict, path: Path, model) -> None:
            """A valid file of another set-up stops the start: skipping it would lose its state."""
            if given is not None and not same_model(model, given):
                raise CheckpointError(f"{path} continues a different model than {cfg.model}; "
                                      "use another --state-dir to start fresh")
            saved = saved_fingerprints(payload, str(path))
            if not same_components(saved, ours):
                raise CheckpointError(f"{path} holds the state of a daemon combining {describe_components(saved)}, "
                                      f"but this one combines {describe_components(ours)}: restart with the same "
                                      "--extra-model and --ngram files (in the same order), or use another "
                                      "--state-dir to start fresh")

        learner = self.state.resume(new_learner, accept) if self.state is not None else None
        return learner or new_learner(primary or load_model(cfg.model or DEFAULT_MODEL))

    def tuned_weights(self, primary, parts: Parts, rule: OnlineRule) -> list[float]:
        """--tune-on: the mixture weights by EM on a validation text, every RNN learning at --lr as
        it will in service (as `rnnlm eval --dynamic LR --tune-on`; each adapts a copy)."""
        cfg = self.config
        rnns = [(cfg.model or str(DEFAULT_MODEL), primary), *parts.extras]
        components = [RNNComponent(model, name, rule) for name, model in rnns]
        if parts.ngram is not None:
            components.append(NGramComponent(parts.ngram[1], parts.ngram[0]))
        mixture = Mixture(components, parts.weights)
        em = mixture.tune(read_tokens(cfg.tune_on))
        weights = [float(w) for w in mixture.weights]
        log.info("mixture weights tuned on %s: %s (%d EM iterations, perplexity there %.2f)", cfg.tune_on,
                 ",".join(f"{w:.6g}" for w in weights), em.iterations, em.perplexity)
        return weights

    def maybe_checkpoint(self) -> None:
        """Collect a finished write; start one when due, in the background, once every worker is
        between messages (handing messages over waits for that, see `handle_in_hand`).

        A checkpoint due while one is still being written waits for it, so a crash loses at most
        two --checkpoint-tokens' worth of updates (and one message): the tokens in flight count toward it."""
        if self.state is None:
            return
        self.state.poll()
        if not self.checkpoint_wanted(0) or self.workers.runs_in_flight:
            return
        if self.state.busy:
            self.state.finish()
        self.start_checkpoint("scheduled")

    def checkpoint_wanted(self, tokens_in_flight: int) -> bool:
        """Whether a checkpoint should be taken once `tokens_in_flight` more tokens are scored. Due
        by time only while the last one is still being written, it waits for the write to end."""
        tokens = self.tokens_since_checkpoint + tokens_in_flight
        return self.checkpoint_due(tokens) and (not self.state.busy or tokens >= self.config.checkpoint_tokens)

    def checkpoint_due(self, tokens_since_checkpoint: int) -> bool:
        cfg = self.config
        if self.state is None:
            return False
        if self.state.failures:  # the last write failed, its changes are unsaved: try again after the pause
            return self.state.may_retry()
        if not (tokens_since_checkpoint or self.changed_since_checkpoint):
            return False
        return (tokens_since_checkpoint >= cfg.checkpoint_tokens
                or time.monotonic() - self.last_checkpoint >= cfg.checkpoint_seconds)

    def start_checkpoint(self, why: str) -> None:
        self.state.begin(self.learner, why)
        # What the snapshot and the streams made since the last one (tens of thousands of objects
        # at 10,000 streams) joins startup's in the frozen generation: a full collection walking
        # it would stop every thread for 100-200 ms. They are freed by reference counting as
        # usual; the daemon makes almost no reference cycles, which only a collection could free.
        gc.freeze()
        self.tokens_since_checkpoint = 0
        self.changed_since_checkpoint = False
        self.last_checkpoint = time.monotonic()

    def write_checkpoint(self, why: str) -> Path:
        """Write a checkpoint now and wait for it (after the one in flight); CheckpointWriteError if it fails.

        With nothing changed since the newest checkpoint of this run, that one is the answer: ten
        pipelined `save`s cost one write."""
        state = self.state
        if state.busy:
            state.finish()
        if state.last_path is not None and not state.failures and not (
                self.tokens_since_checkpoint or self.changed_since_checkpoint):
            return state.last_path
        tokens = self.tokens_since_checkpoint
        self.start_checkpoint(why)
        if state.finish() is None:
            self.tokens_since_checkpoint, self.changed_since_checkpoint = tokens, True
            raise CheckpointWriteError(state.last_error)
        return state.last_path

    def update_gauges(self) -> None:
        self.metrics.streams.set(len(self.learner.streams))
        self.metrics.domains.set(len(self.learner.domains))
        lru = self.learner.evicted["lru"]
        if lru > self.lru_evictions_reported:
            self.metrics.evicted.labels("lru").inc(lru - self.lru_evictions_reported)
            self.metrics.limits.labels("streams").inc(lru - self.lru_evictions_reported)
            self.lru_evictions_reported = lru






def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def return_big_blocks_to_the_system() -> None:
    """Fix glibc's mmap threshold at 1 MiB: big blocks (message frames, snapshot copies) then go
    back to the system when freed. Left dynamic, glibc raises the threshold after the first such
    free and keeps later ones in its heap, so RSS stays high after a burst of big messages."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
