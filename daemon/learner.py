"""The daemon's learning state: adapted weights per domain, hidden state per stream, tallies.

One Learner is driven by one thread, so updates are applied strictly in arrival order. Scoring
and learning go through `RNNLM.score_words`, the same online step as `rnnlm eval --dynamic`.
Decay toward the base weights, the base model's shadow and the rollback guard are in guard.py.

A saved state is checked in full before it is used (`restore`): every tensor's shape and dtype,
finite values, word ids inside the vocabulary (the compiled step does not bounds-check them), so a
damaged or tampered file is refused with a clear error instead of crashing the process later.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from rnnlm.checkpoint import CheckpointError, model_from_payload, model_payload, weights_from_tensors, weights_to_tensors
from rnnlm.corpus import EOS
from rnnlm.evaluate import Tally
from rnnlm import kernels
from rnnlm.model import RNNLM, OnlineRule, StreamState, Weights
from rnnlm.vocab import OOV, RARE_WORD

from .guard import FROZEN, AdaptConfig, Adaptation, GuardState, Sample
from .protocol import MAX_NAME, ProtocolError, Request

STATE_FORMAT = "rnnlm-daemon-state"
TALLY_FIELDS = ("words", "oov", "rare", "loss_nats")
STATE_DTYPES = {"hidden": torch.float32, "inputs": torch.int32, "errors": torch.float32, "meta": torch.int64}


@dataclass
class Domain:
    """A set of adapted weights, starting from the base model's."""

    weights: Weights
    updates: int = 0  # SGD updates applied
    skipped: int = 0  # updates not applied (non-finite loss)
    tally: Tally = field(default_factory=Tally)
    guard: GuardState = field(default_factory=GuardState)  # shadow comparison, snapshots, rollbacks


@dataclass
class Stream:
    state: StreamState
    tally: Tally = field(default_factory=Tally)
    last_seen: float = field(default_factory=time.monotonic)
    shadow: StreamState | None = None  # the base model's own context for this stream (sampled messages only)


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


class Learner:
    def __init__(self, model: RNNLM, rule: OnlineRule, max_streams: int = 10_000, max_domains: int = 16,
                 stream_idle_seconds: float = 3600.0, adapt: AdaptConfig | None = None):
        self.model = model  # its weights are the base model's and never change
        self.rule = rule
        self.adaptation = Adaptation(adapt or AdaptConfig(), model)
        self.max_streams = max_streams
        self.max_domains = max_domains
        self.stream_idle_seconds = stream_idle_seconds
        self.domains: dict[str, Domain] = {}
        self.streams: OrderedDict[tuple[str, str], Stream] = OrderedDict()  # least recently used first
        self.evicted = {"lru": 0, "idle": 0}

    # --- scoring -------------------------------------------------------------------------------

    def domain(self, name: str) -> Domain:
        domain = self.domains.get(name)
        if domain is None:
            if len(self.domains) >= self.max_domains:
                raise ProtocolError("too_many_domains", f"at most {self.max_domains} domains; '{name}' would be one more")
            domain = self.domains[name] = Domain(self.model.weights.copy())
        return domain

    def stream(self, domain: str, name: str) -> Stream:
        key = (domain, name)
        stream = self.streams.get(key)
        if stream is None:
            if len(self.streams) >= self.max_streams:
                self.streams.popitem(last=False)
                self.evicted["lru"] += 1
            stream = self.streams[key] = Stream(self.model.new_state(self.rule))
        else:
            self.streams.move_to_end(key)
        stream.last_seen = time.monotonic()
        return stream

    def score(self, request: Request) -> ScoreResult:
        if request.tokens is not None:
            words = request.tokens
        else:
            words = [w for sentence in request.sentences for w in (*sentence, EOS)]
        domain = self.domain(request.domain)
        stream = self.stream(request.domain, request.stream)
        learn = request.learn and self.rule.learn
        rule = self.rule if learn else OnlineRule(learn=False)
        logprobs, kinds, applied = self.model.score_words(words, stream.state, rule, domain.weights)
        skipped = len(words) - applied if learn else 0
        for tally in (stream.tally, domain.tally):
            tally.add(logprobs, kinds)
        domain.updates += applied
        domain.skipped += skipped
        result = ScoreResult(logprobs, kinds, words, stream, domain, applied, skipped)
        adaptation = self.adaptation
        if applied:
            adaptation.decay(domain.weights)
        if skipped and not domain.weights.all_finite():
            result.rolled_back = adaptation.roll_back(domain.guard, domain.weights, "weights not finite")
        if adaptation.sample():
            if stream.shadow is None:
                stream.shadow = self.model.new_state(FROZEN)
            base, _, _ = self.model.score_words(words, stream.shadow, FROZEN, self.model.weights)
            result.sample = Sample(-float(logprobs.sum()), -float(base.sum()), len(words))
            result.rolled_back = adaptation.observe(domain.guard, domain.weights, result.sample, words) or result.rolled_back
        return result

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
        return {
            "streams": len(self.streams),
            "streams_evicted": dict(self.evicted),
            "domains": {
                name: {
                    "updates": d.updates,
                    "skipped_updates": d.skipped,
                    "words": d.tally.words,
                    "oov": d.tally.oov,
                    "loss_nats": d.tally.loss_nats,
                    "perplexity": d.tally.perplexity if d.tally.words else None,
                    "rollbacks": d.guard.rollbacks,
                    "sampled_tokens": d.guard.sampled_tokens,
                    "sampled_loss_nats": d.guard.sampled_loss,
                    "base_loss_nats": d.guard.base_loss_total,
                }
                for name, d in self.domains.items()
            },
        }

    # --- checkpoints ---------------------------------------------------------------------------

    def to_payload(self) -> dict:
        """Everything needed to continue exactly where we are: base model, domains, streams."""
        return {
            "model": model_payload(self.model),
            "domains": {
                name: {"weights": weights_to_tensors(d.weights), "updates": d.updates, "skipped": d.skipped,
                       "tally": _tally_state(d.tally)}
                for name, d in self.domains.items()
            },
            "streams": [
                {"domain": dom, "stream": name, "tally": _tally_state(s.tally),
                 **{k: torch.from_numpy(getattr(s.state, k)) for k in ("hidden", "inputs", "errors", "meta")}}
                for (dom, name), s in self.streams.items()
            ],
            "evicted": dict(self.evicted),
        }

    def restore(self, payload: dict, where: str) -> None:
        """Take the domains and streams of a saved state (its base model must be ours).

        Everything is checked before it is used; on any error nothing is taken and CheckpointError
        says what is wrong with the file."""
        domains: dict[str, Domain] = {}
        streams: OrderedDict[tuple[str, str], Stream] = OrderedDict()
        try:
            cfg, vocab = self.model.config, self.model.vocab
            if len(payload["domains"]) > self.max_domains:
                raise CheckpointError(f"{where}: {len(payload['domains'])} domains, more than --max-domains {self.max_domains}")
            for name, d in payload["domains"].items():
                _check_name(name, "domain", where)
                weights = weights_from_tensors(d["weights"], len(vocab), cfg.hidden, vocab.num_classes, where)
                updates, skipped = _count(d["updates"], where), _count(d["skipped"], where)
                domains[name] = Domain(weights, updates, skipped, _tally_from(d["tally"], where))
            for s in payload["streams"]:
                _check_name(s["domain"], "domain", where)
                _check_name(s["stream"], "stream", where)
                if s["domain"] not in domains:
                    raise CheckpointError(f"{where}: a stream of domain {s['domain']!r}, which the file does not hold")
                state = self.model.new_state(self.rule)
                for k, dtype in STATE_DTYPES.items():
                    tensor, target = s[k], getattr(state, k)
                    if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != target.shape:
                        raise CheckpointError(f"{where}: stream state '{k}' is not {dtype} of shape {target.shape} "
                                              "(or its window differs from this daemon's)")
                    np.copyto(target, tensor.numpy())
                _check_stream_state(state, len(vocab), where)
                streams[(s["domain"], s["stream"])] = Stream(state, _tally_from(s["tally"], where))
            evicted = {k: _count(v, where) for k, v in payload.get("evicted", {}).items() if k in self.evicted}
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as err:
            raise CheckpointError(f"{where}: damaged daemon state ({type(err).__name__}: {err})") from None
        while len(streams) > self.max_streams:  # a smaller --max-streams than the saved state had
            streams.popitem(last=False)
        self.domains.update(domains)
        self.streams.update(streams)
        self.evicted.update(evicted)


def base_model_of(payload: dict, where: str) -> RNNLM:
    return model_from_payload(payload["model"], where)


def _tally_state(tally: Tally) -> dict:
    return {k: getattr(tally, k) for k in TALLY_FIELDS}


def _tally_from(state: dict, where: str = "state") -> Tally:
    tally = Tally()
    for k in TALLY_FIELDS:
        value = state[k]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise CheckpointError(f"{where}: tally field {k} is not a finite non-negative number")
        setattr(tally, k, type(getattr(tally, k))(value))
    return tally


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: a counter is not a non-negative integer ({value!r})")
    return value


def _check_name(name, what: str, where: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise CheckpointError(f"{where}: a {what} name is not a string of 1 to {MAX_NAME} characters")


def _check_stream_state(state: StreamState, vocab_size: int, where: str) -> None:
    """Word ids index the weight matrices unchecked in the compiled step: they must be in range."""
    window = state.window
    ok = (np.all((state.inputs >= 0) & (state.inputs < vocab_size))
          and 0 <= state.meta[kernels.LAST_WORD] < vocab_size
          and 0 <= state.meta[kernels.PENDING] <= window and 0 <= state.meta[kernels.FILLED] <= window
          and np.isfinite(state.hidden).all() and np.isfinite(state.errors).all())
    if not ok:
        raise CheckpointError(f"{where}: a stream's state holds word ids outside the vocabulary or values out of range")


def token_flags(kinds: np.ndarray) -> tuple[list[int], list[int]]:
    """Positions of OOV and rare tokens, as the reply lists them."""
    return np.flatnonzero(kinds == OOV).tolist(), np.flatnonzero(kinds == RARE_WORD).tolist()
