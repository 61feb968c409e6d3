"""The daemon's learning state: adapted weights per domain, hidden state per stream, tallies.

Each domain is driven by one thread (workers.py), so its updates are applied strictly in arrival order. Scoring
and learning go through `RNNLM.score_words`, the same online step as `rnnlm eval --dynamic`.
Decay toward the base weights, the base model's shadow and the rollback guard are in guard.py.

A saved state is checked in full before it is used (`restore`): every tensor's shape and dtype,
finite values, word ids inside the vocabulary (the compiled step does not bounds-check them), so a
damaged or tampered file is refused with a clear error instead of crashing the process later.

With a mixture (`--extra-model`, `--ngram`; combination.py) every domain also holds adapted weights
for each extra RNN and every stream a state per extra RNN and the n-gram's history; checkpoints hold
them too, under the same checks.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from rnnlm.checkpoint import (STREAM_STATE_DTYPES, CheckpointError, model_from_payload, model_payload, stacked_stream_states,
                              stream_state_from_tensors, stream_state_rows, stream_state_tensors, tally_from_state,
                              tally_to_state, weights_from_tensors, weights_to_tensors)
from rnnlm.evaluate import Tally
from rnnlm.model import RNNLM, OnlineRule, StreamState, Weights
from rnnlm.vocab import OOV, RARE_WORD

from .combination import Combination
from .guard import FROZEN, AdaptConfig, Adaptation, GuardState, Sample
from .protocol import MAX_NAME, Request

STATE_FORMAT = "rnnlm-daemon-state"


class NoRoom(Exception):
    """A new domain would pass one of the learner's bounds; `code` names which (too_many_domains,
    memory_budget): the server answers with it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Domain:
    """A set of adapted weights, starting from the base model's."""

    weights: Weights
    updates: int = 0  # SGD updates applied
    skipped: int = 0  # updates not applied (non-finite loss)
    tally: Tally = field(default_factory=Tally)
    guard: GuardState = field(default_factory=GuardState)  # shadow comparison, snapshots, rollbacks
    extra: list[Weights] = field(default_factory=list)  # with a mixture: each extra RNN's adapted weights
    rnn_loss: float = 0.0  # with a mixture: -Σ ln P of the primary RNN alone (the tally holds the mixture's)
    owner: str | None = None  # with CURVE: the client key that created it (per-key quotas)
    moves: int = 0  # times it went from one fleet member to another (handoff.py: a stale copy has fewer)
    last_seen: float = field(default_factory=time.monotonic)  # last message (idle domains expire)


@dataclass
class Stream:
    state: StreamState
    tally: Tally = field(default_factory=Tally)
    last_seen: float = field(default_factory=time.monotonic)
    shadow: StreamState | None = None  # the base model's own context for this stream (sampled messages only)
    extra: list[StreamState] = field(default_factory=list)  # with a mixture: each extra RNN's state
    history: list[int] | None = None  # with an n-gram: its history (word ids), carried across messages
    seq: int | None = None  # the last sequence number applied (exactly-once retries, docs/protocol.md)
    seq_reply: bytes | None = None  # ...and its reply's fields, msgpack-packed, sent again for a repeat


@dataclass
class MemoryBudget:
    """What the learner's state may take: a fixed part (the process once loaded) plus a cost per
    domain and per stream, worst cases, from the sizes of their arrays (see `costs`)."""

    limit_mb: float
    fixed_bytes: int
    per_domain: int
    per_stream: int

    def room_for(self, domains: int, streams: int) -> bool:
        return self.fixed_bytes + domains * self.per_domain + streams * self.per_stream <= self.limit_mb * 2 ** 20

    def describe(self) -> str:
        return (f"{self.fixed_bytes / 2 ** 20:.0f} MB loaded, {self.per_domain / 2 ** 20:.1f} MB per domain, "
                f"{self.per_stream / 1024:.1f} KB per stream")

    @staticmethod
    def costs(learner: "Learner") -> tuple[int, int]:
        """Bytes per domain and per stream, worst case.

        A domain: its weights (and each extra RNN's), the guard's two snapshots of them when the
        guard is on, and the checkpoint's copy while one is written. A stream: its state arrays
        (and each extra RNN's), the checkpoint's copy, and STREAM_OVERHEAD for the Python objects
        around them (measured: bench/bench_memory.py)."""
        models = [learner.model, *(learner.combination.extras if learner.combination is not None else [])]
        weights = sum(a.nbytes for m in models for a in m.weights.arrays().values())
        guard = 2 if learner.adaptation.config.guard_margin is not None else 0
        state = sum(getattr(m.new_state(learner.rule), k).nbytes for m in models for k in STREAM_STATE_DTYPES)
        return weights * (1 + guard + 1), 2 * state + STREAM_OVERHEAD


STREAM_OVERHEAD = 3 * 1024  # bytes of Python objects per stream (dict entries, Stream, StreamState, Tally)


@dataclass
class ScoreResult:
    logprobs: np.ndarray
    kinds: np.ndarray
    words: list[str]
    stream: Stream
    domain: Domain
    applied: int
    skipped: int
    sample: Sample | None = None  # set when the base model's shadow scored this message too
    rolled_back: str | None = None  # why the domain was rolled back after this message, if it was
    rnn_logprobs: np.ndarray | None = None  # with a mixture: the primary RNN's own (logprobs are the mixture's)
    # as they stood right after this message (a run's later messages move them on)
    stream_perplexity: float = math.nan
    stream_tokens: int = 0
    domain_perplexity: float = math.nan
    domain_updates: int = 0


class Learner:
    def __init__(self, model: RNNLM, rule: OnlineRule, max_streams: int = 10_000, max_domains: int = 16,
                 stream_idle_seconds: float = 3600.0, adapt: AdaptConfig | None = None,
                 combination: Combination | None = None, max_domains_per_key: int | None = None):
        self.model = model  # its weights are the base model's and never change
        self.rule = rule
        self.adaptation = Adaptation(adapt or AdaptConfig(), model)
        self.combination = combination  # extra RNNs and an n-gram in every score (combination.py), or None
        if combination is not None:  # the extra RNNs decay toward their own base weights, at the same rate
            decay = AdaptConfig(decay_to_base=self.adaptation.config.decay_to_base)
            self.extra_adaptations = [Adaptation(decay, m) for m in combination.extras]
        self.max_streams = max_streams
        self.max_domains = max_domains
        self.max_domains_per_key = max_domains_per_key
        self.budget: MemoryBudget | None = None  # --max-memory-mb: refuses domains, caps streams
        self.stream_idle_seconds = stream_idle_seconds
        self.domains: dict[str, Domain] = {}
        self.streams: OrderedDict[tuple[str, str], Stream] = OrderedDict()  # least recently used first
        self.before_learning = None  # called with (domain, stream key) before they change (state.Snapshot)
        self.evicted = {"lru": 0, "idle": 0}
        # Learner threads (workers.py) share the maps of domains and streams: looking a message's
        # domain and stream up (or making them) holds this. Scoring does not: a domain's weights and
        # its streams' states are only ever touched by its own worker.
        self.lock = threading.Lock()

    # --- scoring -------------------------------------------------------------------------------

    def domain(self, name: str, owner: str | None = None) -> Domain:
        domain = self.domains.get(name)
        if domain is None:
            if len(self.domains) >= self.max_domains:
                raise NoRoom("too_many_domains", f"at most {self.max_domains} domains; '{name}' would be one more")
            if self.budget is not None and not self.budget.room_for(len(self.domains) + 1, len(self.streams)):
                raise NoRoom("memory_budget", f"no room for another domain within --max-memory-mb "
                                                     f"{self.budget.limit_mb:.0f} ({self.budget.describe()})")
            if owner is not None and self.max_domains_per_key is not None:
                owned = sum(d.owner == owner for d in self.domains.values())
                if owned >= self.max_domains_per_key:
                    raise NoRoom("too_many_domains", f"this client key made {owned} domains already, the most "
                                                            f"one key may make (--max-domains-per-key)")
            domain = self.domains[name] = Domain(self.model.weights.adapted_copy(), owner=owner)
            if self.combination is not None:
                domain.extra = self.combination.new_weights()
        domain.last_seen = time.monotonic()
        return domain

    def base_domain(self) -> Domain:
        """A throwaway domain holding the base weights, for `learn: false` on a domain that does not
        exist: scored like a new domain would be, without creating one."""
        domain = Domain(self.model.weights)
        if self.combination is not None:
            domain.extra = [m.weights for m in self.combination.extras]
        return domain

    def drop_domain(self, name: str) -> bool:
        """Forget a domain and its streams."""
        if self.domains.pop(name, None) is None:
            return False
        for key in [k for k in self.streams if k[0] == name]:
            del self.streams[key]
        return True

    def idle_domains(self, seconds: float) -> list[str]:
        cutoff = time.monotonic() - seconds
        return [name for name, d in self.domains.items() if d.last_seen < cutoff]

    def stream(self, domain: str, name: str) -> Stream:
        key = (domain, name)
        stream = self.streams.get(key)
        if stream is None:
            while self.streams and (len(self.streams) >= self.max_streams or (
                    self.budget is not None and not self.budget.room_for(len(self.domains), len(self.streams) + 1))):
                self.streams.popitem(last=False)  # the memory budget caps streams as --max-streams does
                self.evicted["lru"] += 1
            stream = self.streams[key] = Stream(self.model.new_state(self.rule))
            if self.combination is not None:
                stream.extra = self.combination.new_states(self.rule)
                stream.history = self.combination.new_history()
        else:
            self.streams.move_to_end(key)
        stream.last_seen = time.monotonic()
        return stream

    @property
    def scores_runs(self) -> bool:
        """Whether consecutive messages of a stream may be scored in one call (`score_run`).

        Decay and the base model's shadow act once per message, so with either on, messages are
        scored one at a time."""
        adapt = self.adaptation.config
        return not adapt.decay_to_base and not adapt.shadow_sample

    def score(self, request: Request, owner: str | None = None) -> ScoreResult:
        return self.score_run([request], owner)[0]

    def score_run(self, requests: list[Request], owner: str | None = None) -> list[ScoreResult]:
        """Score messages of one stream (same domain, stream and `learn`), in order, in one call
        into the online step; one result per message.

        The step is sequential and carries the stream's state from word to word, so this gives the
        same numbers, bit for bit, as scoring the messages one by one; one long call runs faster
        than many short ones with Python work in between. Only with `scores_runs` may a run hold
        more than one message. Should the weights stop being finite inside a run, the roll-back
        comes after the run rather than after the message."""
        first = requests[0]
        if len(requests) > 1 and not self.scores_runs:
            raise ValueError("several messages in one call need decay and shadow sampling off")
        messages = [r.words for r in requests]
        words = [w for m in messages for w in m]
        learn = first.learn and self.rule.learn
        with self.lock:
            transient = not learn and first.domain not in self.domains  # `learn: false` never creates a domain
            domain = self.base_domain() if transient else self.domain(first.domain, owner)
            stream = self.stream(first.domain, first.stream)
        rule = self.rule if learn else FROZEN
        if self.before_learning is not None:  # (the guard may roll weights back even when not learning)
            self.before_learning(first.domain, (first.domain, first.stream))
        logprobs, kinds, applied = self.model.score_words(words, stream.state, rule, domain.weights)
        rnn_logprobs = None
        if self.combination is not None:
            rnn_logprobs, (logprobs, extra_applied) = logprobs, self.combination.score(
                words, logprobs, domain.extra, stream.extra, stream.history, rule)
        results = []
        lo = 0
        for m in messages:
            results.append(self._account(slice(lo, lo + len(m)), m, logprobs, kinds, rnn_logprobs, learn, stream, domain))
            lo += len(m)
        assert sum(r.applied for r in results) == applied, "the step's update count and the per-message count agree"

        result = results[-1]  # what follows acts once per call: per message when the guard is on
        adaptation = self.adaptation
        if applied:
            adaptation.decay(domain.weights)
        if applied < len(words) and learn and not domain.weights.all_finite():
            result.rolled_back = adaptation.roll_back(domain.guard, domain.weights, "weights not finite")
        if rnn_logprobs is not None:
            self._adapt_extras(domain, extra_applied, len(words) if learn else 0, result)
        if not transient and adaptation.sample():
            if stream.shadow is None:
                stream.shadow = self.model.new_state(FROZEN)
            base, _, _ = self.model.score_words(words, stream.shadow, FROZEN, self.model.weights)
            sample = result.sample = Sample(-float(rnn_logprobs.sum() if rnn_logprobs is not None else logprobs.sum()),
                                            -float(base.sum()), len(words))
            rolled_back = adaptation.observe(domain.guard, domain.weights, sample, words)
            if rolled_back and self.combination is not None:
                self._reset_extras(domain)
            result.rolled_back = rolled_back or result.rolled_back
        return results

    @staticmethod
    def _account(span: slice, words: list[str], logprobs: np.ndarray, kinds: np.ndarray,
                 rnn_logprobs: np.ndarray | None, learn: bool, stream: Stream, domain: Domain) -> ScoreResult:
        """One message's share of a run: its numbers, and the tallies and counters as they stood after it.

        The step learns from every word whose ln P under the primary RNN is finite."""
        primary = rnn_logprobs if rnn_logprobs is not None else logprobs
        applied = int(np.isfinite(primary[span]).sum()) if learn else 0
        skipped = len(words) - applied if learn else 0
        logp, kind = logprobs[span], kinds[span]
        for tally in (stream.tally, domain.tally):
            tally.add(logp, kind)
        domain.updates += applied
        domain.skipped += skipped
        rnn = None
        if rnn_logprobs is not None:
            rnn = rnn_logprobs[span]
            domain.rnn_loss -= float(rnn.sum())
        return ScoreResult(logp, kind, words, stream, domain, applied, skipped, rnn_logprobs=rnn,
                           stream_perplexity=stream.tally.perplexity, stream_tokens=stream.tally.words,
                           domain_perplexity=domain.tally.perplexity, domain_updates=domain.updates)

    def _adapt_extras(self, domain: Domain, applied: list[int], tried: int, result: ScoreResult) -> None:
        """Decay for the extra RNNs, and their non-finite check (back to their base weights)."""
        for j, weights in enumerate(domain.extra):
            if applied[j]:
                self.extra_adaptations[j].decay(weights)
            if applied[j] < tried and not weights.all_finite():
                weights.assign(self.combination.extras[j].weights)
                domain.guard.rollbacks += 1
                why = f"extra model {j + 1}'s weights not finite; back to its base weights"
                result.rolled_back = f"{result.rolled_back}; {why}" if result.rolled_back else why

    def _reset_extras(self, domain: Domain) -> None:
        """The guard rolled the primary RNN back: the extra RNNs (no snapshots) go back to their base."""
        for weights, model in zip(domain.extra, self.combination.extras):
            weights.assign(model.weights)

    def warm_up(self) -> None:
        """Run the online step once on throwaway copies, so that loading the compiled code (a
        fraction of a second) happens before the daemon says it is ready, not in the first reply."""
        models = [self.model, *(self.combination.extras if self.combination is not None else [])]
        for model in models:
            model.step(np.array([model.vocab.eos_id]), model.new_state(self.rule), self.rule, model.weights.copy())

    def reset(self, domain: str, name: str) -> bool:
        return self.streams.pop((domain, name), None) is not None

    def expire_idle(self) -> int:
        cutoff = time.monotonic() - self.stream_idle_seconds
        stale = [key for key, s in self.streams.items() if s.last_seen < cutoff]
        for key in stale:
            del self.streams[key]
        self.evicted["idle"] += len(stale)
        return len(stale)

    def stats(self) -> dict:
        mixing = self.combination is not None
        return {
            "streams": len(self.streams),
            "streams_evicted": dict(self.evicted),
            "domains": {
                name: {
                    "updates": d.updates,
                    "skipped_updates": d.skipped,
                    "tokens": d.tally.words,
                    "oov": d.tally.oov,
                    "loss_nats": d.tally.loss_nats,
                    "perplexity": d.tally.perplexity if d.tally.words else None,
                    "rollbacks": d.guard.rollbacks,
                    "sampled_tokens": d.guard.sampled_tokens,
                    "sampled_loss_nats": d.guard.sampled_loss,
                    "base_loss_nats": d.guard.base_loss_total,
                    **({"rnn_loss_nats": d.rnn_loss,
                        "rnn_perplexity": math.exp(d.rnn_loss / d.tally.words) if d.tally.words else None}
                       if mixing else {}),
                }
                for name, d in self.domains.items()
            },
        }

    # --- checkpoints ---------------------------------------------------------------------------

    def to_payload(self, copy: bool = False, domain_weights: bool = True, stream_states: bool = True) -> dict:
        """Everything needed to continue exactly where we are: base model, domains, streams.

        With `copy`, every array that learning changes is copied, so the payload can be written
        by another thread while this one goes on learning (the base model never changes).
        Without `domain_weights` and `stream_states`, the domains' weights and everything about the
        streams are left out, for state.Snapshot to copy them later, each before it changes.

        With a mixture also: which extra models and n-gram the state belongs to, each domain's
        adapted weights of every extra RNN, each stream's state per extra RNN and n-gram history."""
        combination = self.combination
        payload = {
            "model": model_payload(self.model),
            "domains": {name: self.domain_entry(d, copy, domain_weights) for name, d in self.domains.items()},
            "evicted": dict(self.evicted),
        }
        if stream_states:
            self._add_streams(payload, list(self.streams), copy)
        if combination is not None:
            payload["components"] = [dict(p) for p in combination.fingerprints]
        return payload

    def part_payload(self, names: list[str]) -> dict:
        """Some domains and their streams, in the format of `to_payload` less the base model (a fleet's
        handoff file): `restore` on a learner of the same base model takes them up exactly where they are."""
        payload = {"domains": {name: self.domain_entry(self.domains[name], True, True) for name in names}}
        wanted = set(names)
        self._add_streams(payload, [key for key in self.streams if key[0] in wanted], True)
        if self.combination is not None:
            payload["components"] = [dict(p) for p in self.combination.fingerprints]
        return payload

    def domain_entry(self, d: Domain, copy: bool, weights: bool) -> dict:
        entry = {**(self.weights_payload(d, copy) if weights else {}), "updates": d.updates, "skipped": d.skipped,
                 "tally": tally_to_state(d.tally), "moves": d.moves, **({"owner": d.owner} if d.owner else {})}
        if self.combination is not None:
            entry["rnn_loss_nats"] = d.rnn_loss
        return entry

    def _add_streams(self, payload: dict, keys: list[tuple[str, str]], copy: bool) -> None:
        payload["streams"] = [self.stream_entry(key, self.streams[key], copy) for key in keys]
        # Row i is streams[i]'s state: a few big tensors instead of four per stream, which
        # would make the snapshot and the write (one Python call per tensor) take seconds.
        payload["stream_states"] = stacked_stream_states([self.streams[key].state for key in keys],
                                                         self.model.new_state(self.rule))

    def stream_entry(self, key: tuple[str, str], stream: Stream, copy: bool) -> dict:
        """What a checkpoint holds of one stream besides its hidden state: tally, last seq and reply,
        and with a mixture each extra RNN's state and the n-gram history."""
        entry = {"domain": key[0], "stream": key[1], "tally": tally_to_state(stream.tally), **_seq_state(stream)}
        if self.combination is not None:
            entry["extra_states"] = [stream_state_tensors(state, copy) for state in stream.extra]
            if stream.history is not None:
                entry["ngram_history"] = torch.tensor(self.combination.saved_history(stream.history), dtype=torch.int64)
        return entry

    def weights_payload(self, domain: Domain, copy: bool) -> dict:
        """A domain's adapted weights (and with a mixture, each extra RNN's) as a checkpoint holds them."""
        entry = {"weights": weights_to_tensors(domain.weights, copy)}
        if self.combination is not None:
            entry["extra_weights"] = [weights_to_tensors(w, copy) for w in domain.extra]
        return entry

    def restore(self, payload: dict, where: str, only: set[str] | None = None) -> None:
        """Take the domains and streams of a saved state (its base model must be ours); with `only`,
        those of these domains alone, replacing this learner's copies of them.

        Everything is checked before it is used; on any error nothing is taken and CheckpointError
        says what is wrong with the file."""
        domains: dict[str, Domain] = {}
        streams: OrderedDict[tuple[str, str], Stream] = OrderedDict()
        combination = self.combination
        extras = combination.extras if combination is not None else []
        try:
            wanted = {n: d for n, d in payload["domains"].items() if only is None or n in only}
            if len(set(self.domains) | set(wanted)) > self.max_domains:
                raise CheckpointError(f"{where}: {len(wanted)} domains, with the {len(self.domains)} held "
                                      f"already more than --max-domains {self.max_domains}")
            for name, d in wanted.items():
                _check_name(name, "domain", where)
                weights = _weights_for(self.model, d["weights"], where)
                updates, skipped = _count(d["updates"], where), _count(d["skipped"], where)
                domains[name] = domain = Domain(weights, updates, skipped, tally_from_state(d["tally"], where))
                owner = d.get("owner")
                if owner is not None and not isinstance(owner, str):
                    raise CheckpointError(f"{where}: a domain's owner is not a key name")
                domain.owner = owner
                domain.moves = _count(d.get("moves", 0), where)
                if combination is not None:
                    saved = _list_of(d["extra_weights"], len(extras), "extra models' weights", where)
                    domain.extra = [_weights_for(m, w, where) for m, w in zip(extras, saved)]
                    domain.rnn_loss = tally_from_state({"loss_nats": d["rnn_loss_nats"]}, where, ("loss_nats",)).loss_nats
            rows = stream_state_rows(payload.get("stream_states"), len(payload["streams"]), where)
            for i, s in enumerate(payload["streams"]):
                if only is not None and s.get("domain") not in only:
                    continue
                if rows is not None:
                    s = {**s, **{k: rows[k][i] for k in STREAM_STATE_DTYPES}}
                _check_name(s["domain"], "domain", where)
                _check_name(s["stream"], "stream", where)
                stream = Stream(self._state_from(self.model, s, where), tally_from_state(s["tally"], where))
                stream.seq, stream.seq_reply = _seq_from(s, where)
                if combination is not None:
                    saved = _list_of(s["extra_states"], len(extras), "extra models' stream states", where)
                    stream.extra = [self._state_from(m, state, where) for m, state in zip(extras, saved)]
                    if combination.ngram is not None:
                        ids = s["ngram_history"]
                        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
                            raise CheckpointError(f"{where}: a stream's n-gram history is not an int64 tensor")
                        stream.history = combination.check_history(ids.numpy(), where)
                streams[(s["domain"], s["stream"])] = stream
            saved_evictions = payload.get("evicted", {}) if only is None else {}  # another member's, with `only`
            evicted = {k: _count(v, where) for k, v in saved_evictions.items() if k in self.evicted}
        except CheckpointError:
            raise
        except Exception as err:  # any field of the wrong kind or shape: a damaged file, never a crash
            raise CheckpointError(f"{where}: damaged daemon state ({type(err).__name__}: {err})") from None
        while len(streams) > self.max_streams:  # a smaller --max-streams than the saved state had
            streams.popitem(last=False)
        for name in domains:
            self.drop_domain(name)  # a stale copy and its streams, replaced whole
        self.domains.update(domains)
        self.streams.update(streams)
        self.evicted.update(evicted)

    def _state_from(self, model: RNNLM, saved: dict, where: str) -> StreamState:
        return stream_state_from_tensors(saved, model.new_state(self.rule), len(model.vocab), where)


def _seq_state(stream: Stream) -> dict:
    """A stream's last sequence number and its stored reply (bytes in a uint8 tensor: a checkpoint
    holds only tensors and plain values)."""
    if stream.seq is None:
        return {}
    return {"seq": stream.seq, "seq_reply": torch.frombuffer(bytearray(stream.seq_reply), dtype=torch.uint8)}


def _seq_from(saved: dict, where: str) -> tuple[int | None, bytes | None]:
    seq, reply = saved.get("seq"), saved.get("seq_reply")
    if seq is None:
        return None, None
    if type(seq) is not int or seq < 1 or not isinstance(reply, torch.Tensor) or reply.dtype != torch.uint8:
        raise CheckpointError(f"{where}: a stream's sequence number or stored reply is damaged")
    packed = reply.numpy().tobytes()
    try:
        fields = msgpack.unpackb(packed, raw=False)
    except Exception:
        raise CheckpointError(f"{where}: a stream's stored reply is not msgpack") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where}: a stream's stored reply is not a map")
    return seq, packed


def base_model_of(payload: dict, where: str) -> RNNLM:
    return model_from_payload(payload.get("model") if isinstance(payload, dict) else None, where)


def _weights_for(model: RNNLM, tensors, where: str) -> Weights:
    cfg, vocab = model.config, model.vocab
    return weights_from_tensors(tensors, len(vocab), cfg.hidden, vocab.num_classes, where, cfg.direct_size, model.weights)


def _list_of(value, count: int, what: str, where: str) -> list:
    if not isinstance(value, list) or len(value) != count:
        raise CheckpointError(f"{where}: {what}: expected a list of {count}")
    return value


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: a counter is not a non-negative integer ({value!r})")
    return value


def _check_name(name, what: str, where: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise CheckpointError(f"{where}: a {what} name is not a string of 1 to {MAX_NAME} characters")


def token_flags(kinds: np.ndarray) -> tuple[list[int], list[int]]:
    """Positions of OOV and rare tokens, as the reply lists them."""
    return np.flatnonzero(kinds == OOV).tolist(), np.flatnonzero(kinds == RARE_WORD).tolist()
