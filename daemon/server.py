"""The long-running process: startup → main loop → shutdown, signals handled in one place.

One thread owns the sockets and the Learner, so every update is applied in arrival order and no
lock is needed. Messages are drained from the sockets into an in-hand queue (its length is the
queue-depth metric), handled in arrival order, and answered; consecutive score messages of one
stream go through the online step in one call, each still answered on its own. SIGTERM or SIGINT
stops the intake; what is in hand is answered, a checkpoint is written, and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from rnnlm.checkpoint import CheckpointError, VERSION, load_model, read_checked, write_atomic
from rnnlm.bundled import DEFAULT_MODEL
from rnnlm.model import OnlineRule

from . import protocol
from . import systemd
from .auth import CurveServer
from .combination import Combination, Parts, describe_components, same_components, saved_fingerprints
from .guard import AdaptConfig
from .learner import STATE_FORMAT, Learner, base_model_of, message_words, token_flags
from .metrics import Metrics
from .protocol import ProtocolError

log = logging.getLogger("rnnlm.daemon")

RUN_TOKENS = 1024  # most tokens scored in one call for consecutive messages of a stream (bounds their latency)



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
    max_in_hand: int = 1_000  # messages drained from the sockets before handling
    curve_secret_key: str | None = None  # the daemon's NAME.key_secret: CURVE on both sockets
    curve_authorized_dir: str | None = None  # public keys of the clients let in (ZAP)
    decay_to_base: float = 0.0  # adaptation guard (guard.py): all off by default
    shadow_sample: float = 0.0
    guard_margin: float | None = None
    guard_window: int = 2000
    extra_models: tuple[str, ...] = ()  # extra RNNs in every score (combination.py), adapting like the primary
    ngram: str | None = None  # an ARPA model in every score
    weights: tuple[float, ...] | None = None  # primary, extras, n-gram; None: the n-gram 0.25, the RNNs share the rest


@dataclass
class Message:
    """One message taken from a socket, parsed (or refused) and waiting for its answer."""

    frames: list[bytes]  # the last is the request; the ones before it route the reply
    fire_and_forget: bool  # from the PULL socket: handled and counted, never answered
    start: float  # when parsing began
    op: str = "invalid"
    rid: object = None
    request: protocol.Request | None = None
    failure: tuple[dict, str] | None = None  # the error reply and its code, when it could not be parsed
    parsed: float = 0.0  # seconds spent parsing


class Server:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.should_exit = False
        self.metrics = Metrics()
        self.in_hand: deque = deque()
        self.tokens_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        self.checkpoint_seq = 0
        self.lru_evictions_reported = 0
        self.exit_code = 0
        self.curve: CurveServer | None = None

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
        self.learner = self.load_learner()
        self.learner.warm_up()
        model = self.learner.model
        components = self.components()
        self.metrics.info.info({k: str(v) for k, v in {
            **model.describe(), "lr": cfg.lr, "learning": cfg.learn,
            "components": ", ".join(f"{c['name']} ({c['kind']})" for c in components),
            "weights": ",".join(f"{c['weight']:.6g}" for c in components)}.items()})
        self.ctx = zmq.Context()
        self.curve = (CurveServer(self.ctx, cfg.curve_secret_key, cfg.curve_authorized_dir, self.metrics.handshake_failures)
                      if cfg.curve_secret_key else None)
        self.router = self.bind(zmq.ROUTER, cfg.bind)
        self.pull = self.bind(zmq.PULL, cfg.pull_bind) if cfg.pull_bind else None
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.pull is not None:
            self.poller.register(self.pull, zmq.POLLIN)
        self.http = self.metrics.serve(cfg.metrics_addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_exit)
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

    def main_loop(self) -> None:
        next_sweep = time.monotonic() + 10.0
        watchdog = systemd.Watchdog()  # WatchdogSec=: a wedged loop gets restarted
        while not self.should_exit:
            watchdog.ping()
            ready = dict(self.poller.poll(100))
            self.receive(ready)
            self.handle_in_hand()
            self.maybe_checkpoint()
            if time.monotonic() >= next_sweep:
                self.metrics.evicted.labels("idle").inc(self.learner.expire_idle())
                next_sweep = time.monotonic() + 10.0
            self.update_gauges()

    def shutdown(self) -> None:
        systemd.notify("STOPPING=1")
        # Answer what has already arrived, then stop.
        self.receive({self.router: zmq.POLLIN, **({self.pull: zmq.POLLIN} if self.pull else {})})
        self.handle_in_hand()
        try:
            if self.config.state_dir and self.checkpoint("shutdown") is None:
                self.exit_code = 1
        finally:
            if self.curve is not None:
                self.curve.stop()
            self.router.close()
            if self.pull is not None:
                self.pull.close()
            self.ctx.term()
            self.http.shutdown()
            log.info("stopped")

    # --- messages ------------------------------------------------------------------------------

    def receive(self, ready: dict) -> None:
        for socket in (self.router, self.pull):
            if socket is None or socket not in ready:
                continue
            while len(self.in_hand) < self.config.max_in_hand:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.in_hand.append((socket, frames))
            if len(self.in_hand) >= self.config.max_in_hand and socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self.metrics.limits.labels("pending").inc()  # the rest waits in ZeroMQ's queue (RCVHWM)
        self.metrics.queue_depth.set(len(self.in_hand))

    def handle_in_hand(self) -> None:
        """Answer every message in hand, in arrival order.

        Consecutive score messages of one stream go through the online step in one call (see
        `next_run`); each still gets its own reply and metrics, with the same numbers as if it had
        been scored alone."""
        messages = deque(self.parse(socket, frames) for socket, frames in self.in_hand)
        self.in_hand.clear()
        while messages:
            run = self.next_run(messages)
            if len(run) == 1:
                start = time.perf_counter()
                reply, outcome = self.execute(run[0])
                self.answer(run[0], reply, outcome, run[0].parsed + time.perf_counter() - start)
            else:
                self.answer_run(run)
            self.maybe_checkpoint()  # after each call: a crash loses at most --checkpoint-tokens + one message
        self.metrics.queue_depth.set(0)

    def next_run(self, messages: deque) -> list[Message]:
        """Take the next message, and the score messages right behind it that can share its call.

        A run stops at another stream (or domain, or `learn`), at RUN_TOKENS, and at the message
        that makes a checkpoint due: checkpoints fall after the same messages as without runs."""
        run = [messages.popleft()]
        head = run[0].request
        if head is None or head.op != "score" or not self.learner.scores_runs:
            return run
        tokens = len(message_words(head))
        while messages and tokens < RUN_TOKENS and not self.checkpoint_due(self.tokens_since_checkpoint + tokens):
            request = messages[0].request
            if (request is None or request.op != "score" or (request.domain, request.stream, request.learn)
                    != (head.domain, head.stream, head.learn)):
                break
            n = len(message_words(request))
            if tokens + n > RUN_TOKENS:
                break
            run.append(messages.popleft())
            tokens += n
        return run

    def parse(self, socket: zmq.Socket, frames: list[bytes]) -> Message:
        message = Message(frames, socket is self.pull, time.perf_counter())
        try:
            frame = frames[-1]
            protocol.check_size(frame, self.config.max_message_bytes)
            decoded = protocol.decode(frame)
            message.rid = protocol.request_id(decoded)
            message.op = decoded.get("op") if decoded.get("op") in protocol.OPS else "unknown"
            message.request = protocol.parse(decoded, self.config.max_tokens)
            if message.fire_and_forget and message.op not in protocol.DATA_OPS:
                raise ProtocolError("wrong_socket", f"'{message.op}' is a control op; send it to the request socket")
        except Exception as err:
            message.request = None
            message.failure = self.failure(message, err)
        message.parsed = time.perf_counter() - message.start
        return message

    def execute(self, message: Message) -> tuple[dict, str]:
        """The reply to one message, and its outcome for the metrics ("ok" or an error code)."""
        if message.failure is not None:
            return message.failure
        try:
            return getattr(self, f"op_{message.op}")(message.request), "ok"
        except Exception as err:
            return self.failure(message, err)

    def answer_run(self, run: list[Message]) -> None:
        start = time.perf_counter()
        try:
            results = self.learner.score_run([m.request for m in run])
            self.metrics.step_calls.inc()
            outcomes = [(self.score_reply(m.request, r), "ok") for m, r in zip(run, results)]
        except Exception as err:  # e.g. too_many_domains: each message would have got the same answer
            outcomes = [self.failure(m, err) for m in run]
        # Each message is charged its share of the call, by tokens, plus its own parsing.
        tokens = [len(message_words(m.request)) for m in run]
        seconds = time.perf_counter() - start
        for message, (reply, outcome), n in zip(run, outcomes, tokens):
            self.answer(message, reply, outcome, message.parsed + seconds * n / max(sum(tokens), 1))

    def failure(self, message: Message, err: Exception) -> tuple[dict, str]:
        if isinstance(err, ProtocolError):
            if err.code in protocol.LIMIT_OF_CODE:
                self.metrics.limits.labels(protocol.LIMIT_OF_CODE[err.code]).inc()
            return protocol.error(message.rid, err.code, err.message), err.code
        # a bug must not take the daemon down; say so and go on
        log.error("internal error handling %s", message.op, exc_info=err)
        return protocol.error(message.rid, "internal", f"internal error: {type(err).__name__}"), "internal"

    def answer(self, message: Message, reply: dict, outcome: str, seconds: float) -> None:
        m = self.metrics
        m.child(m.messages, "pull" if message.fire_and_forget else "router", message.op, outcome).inc()
        m.child(m.duration, message.op).observe(seconds)
        if not message.fire_and_forget:
            self.router.send_multipart([*message.frames[:-1], protocol.encode(reply)])

    def op_score(self, request: protocol.Request) -> dict:
        result = self.learner.score(request)
        self.metrics.step_calls.inc()
        return self.score_reply(request, result)

    def score_reply(self, request: protocol.Request, result) -> dict:
        """The reply to one scored message, and its metrics."""
        m, d = self.metrics, request.domain
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
        self.tokens_since_checkpoint += n
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

    def op_reset(self, request: protocol.Request) -> dict:
        return protocol.ok(request.id, existed=self.learner.reset(request.domain, request.stream))

    def op_stats(self, request: protocol.Request) -> dict:
        return protocol.ok(request.id, **self.learner.stats(), seconds_since_checkpoint=time.monotonic() - self.last_checkpoint)

    def op_save(self, request: protocol.Request) -> dict:
        if not self.config.state_dir:
            raise ProtocolError("no_state_dir", "the daemon runs without --state-dir, so there is nowhere to save")
        path = self.checkpoint("requested")
        if path is None:
            raise ProtocolError("checkpoint_failed", "the checkpoint could not be written; see the daemon's log")
        return protocol.ok(request.id, path=str(path))

    def op_ping(self, request: protocol.Request) -> dict:
        return protocol.ok(request.id, pong=True)

    def op_info(self, request: protocol.Request) -> dict:
        cfg = self.config
        return protocol.ok(request.id, protocol=protocol.VERSION, model=cfg.model or "bundled default",
                           **self.learner.model.describe(), lr=cfg.lr, learning=cfg.learn,
                           max_tokens=cfg.max_tokens, max_message_bytes=cfg.max_message_bytes,
                           eos="</s>", logprob_base="e", components=self.components())

    def components(self) -> list[dict]:
        """The models in every score: name, kind, weight (the primary RNN alone when not mixing)."""
        if self.learner.combination is None:
            return [{"name": self.config.model or "bundled default", "kind": "rnn", "weight": 1.0}]
        return self.learner.combination.describe()

    # --- state ---------------------------------------------------------------------------------

    def load_learner(self) -> Learner:
        """Resume from the newest checkpoint that is whole and valid, else start from the model.

        A damaged or tampered file is skipped for the one before it; if there are checkpoints and
        none can be used, the daemon refuses to start rather than silently forget (and later rotate
        away) the state they hold."""
        cfg = self.config
        rule = OnlineRule(lr=cfg.lr, learn=cfg.learn)
        adapt = AdaptConfig(cfg.decay_to_base, cfg.shadow_sample, cfg.guard_margin, cfg.guard_window)

        parts = None
        if cfg.extra_models or cfg.ngram:
            parts = Parts.load(cfg.extra_models, cfg.ngram, cfg.weights or default_weights(len(cfg.extra_models), cfg.ngram))
            log.info("combining every score with %s", describe_components(parts.fingerprints))
        ours = parts.fingerprints if parts is not None else []

        def new_learner(model) -> Learner:
            combination = Combination(model, cfg.model or "bundled default", parts) if parts is not None else None
            return Learner(model, rule, cfg.max_streams, cfg.max_domains, cfg.stream_idle_seconds, adapt, combination)

        self.remove_temporary_files()
        files = self.checkpoint_files()
        given = load_model(cfg.model) if cfg.model is not None and files else None
        for path in reversed(files):
            try:
                payload = read_checked(path, STATE_FORMAT)
                model = base_model_of(payload, str(path))
                saved = saved_fingerprints(payload, str(path))
            except CheckpointError as err:
                log.warning("skipping %s", err)
                continue
            if given is not None and not same_model(model, given):
                raise CheckpointError(f"{path} continues a different model than {cfg.model}; "
                                      "use another --state-dir to start fresh")
            if not same_components(saved, ours):
                raise CheckpointError(f"{path} holds the state of a daemon combining {describe_components(saved)}, "
                                      f"but this one combines {describe_components(ours)}: restart with the same "
                                      "--extra-model and --ngram files (in the same order), or use another "
                                      "--state-dir to start fresh")
            learner = new_learner(model)
            try:
                learner.restore(payload, str(path))
            except CheckpointError as err:
                log.warning("skipping %s", err)
                continue
            self.checkpoint_seq = int(files[-1].stem.split("-")[-1])  # never reuse a damaged file's name
            log.info("resumed from %s: %d domain(s), %d stream(s)", path, len(learner.domains), len(learner.streams))
            return learner
        if files:
            raise CheckpointError(f"{cfg.state_dir}: none of its {len(files)} checkpoint file(s) can be used (see the "
                                  "warnings above); move them away to start afresh from the model")
        return new_learner(load_model(cfg.model or DEFAULT_MODEL))

    def remove_temporary_files(self) -> None:
        """A checkpoint being written when the process was killed leaves its temporary file."""
        if self.config.state_dir:
            for tmp in Path(self.config.state_dir).glob(".state-*.tmp"):
                log.info("removing %s, left by an interrupted checkpoint", tmp)
                tmp.unlink(missing_ok=True)

    def checkpoint_files(self) -> list[Path]:
        if not self.config.state_dir:
            return []
        return sorted(Path(self.config.state_dir).glob("state-*.pt"))

    def maybe_checkpoint(self) -> None:
        if self.checkpoint_due(self.tokens_since_checkpoint):
            self.checkpoint("scheduled")

    def checkpoint_due(self, tokens_since_checkpoint: int) -> bool:
        cfg = self.config
        if not cfg.state_dir or not tokens_since_checkpoint:
            return False
        return (tokens_since_checkpoint >= cfg.checkpoint_tokens
                or time.monotonic() - self.last_checkpoint >= cfg.checkpoint_seconds)

    def checkpoint(self, why: str) -> Path | None:
        if not self.config.state_dir:
            return None
        self.checkpoint_seq += 1
        path = Path(self.config.state_dir) / f"state-{self.checkpoint_seq:08d}.pt"
        start = time.perf_counter()
        try:
            write_atomic(path, {"format": STATE_FORMAT, "version": VERSION, **self.learner.to_payload()})
        except OSError as err:
            self.metrics.checkpointed(False)
            log.error("checkpoint failed: %s", err)
            return None
        self.metrics.checkpointed(True)
        self.tokens_since_checkpoint = 0
        self.last_checkpoint = time.monotonic()
        for old in self.checkpoint_files()[:-self.config.keep_checkpoints]:
            old.unlink(missing_ok=True)
        log.info("checkpoint %s (%s, %.0f ms)", path, why, 1000 * (time.perf_counter() - start))
        return path

    def update_gauges(self) -> None:
        self.metrics.streams.set(len(self.learner.streams))
        self.metrics.domains.set(len(self.learner.domains))
        lru = self.learner.evicted["lru"]
        if lru > self.lru_evictions_reported:
            self.metrics.evicted.labels("lru").inc(lru - self.lru_evictions_reported)
            self.metrics.limits.labels("streams").inc(lru - self.lru_evictions_reported)
            self.lru_evictions_reported = lru


def default_weights(extra_count: int, ngram: str | None, ngram_weight: float = 0.25) -> list[float]:
    """As `rnnlm eval`: the n-gram gets `ngram_weight`, the RNNs (primary and extras) share the rest."""
    rnns = 1 + extra_count
    kn = ngram_weight if ngram else 0.0
    return [(1.0 - kn) / rnns] * rnns + ([kn] if ngram else [])


def same_model(a, b) -> bool:
    return a.vocab.words == b.vocab.words and all(
        (x == y).all() for x, y in zip(a.weights.arrays().values(), b.weights.arrays().values()))


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
