"""The daemon's learning state: adapted weights per domain, hidden state per stream, tallies.

One Learner is driven by one thread, so updates are applied strictly in arrival order. Scoring
and learning go through `RNNLM.score_words`, the same online step as `rnnlm eval --dynamic`.
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
from rnnlm.model import RNNLM, OnlineRule, StreamState, Weights
from rnnlm.vocab import OOV, RARE_WORD

from .protocol import ProtocolError, Request

STATE_FORMAT = "rnnlm-daemon-state"
TALLY_FIELDS = ("words", "oov", "rare", "loss_nats")


@dataclass
class Domain:
    """A set of adapted weights, starting from the base model's."""

    weights: Weights
    updates: int = 0  # SGD updates applied
    skipped: int = 0  # updates not applied (non-finite loss)
    tally: Tally = field(default_factory=Tally)


@dataclass
class Stream:
    state: StreamState
    tally: Tally = field(default_factory=Tally)
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class ScoreResult:
    logprobs: np.ndarray
    kinds: np.ndarray
    words: list[str]
    stream: Stream
    domain: Domain
    applied: int
    skipped: int


class Learner:
    def __init__(self, model: RNNLM, rule: OnlineRule, max_streams: int = 10_000, max_domains: int = 16,
                 stream_idle_seconds: float = 3600.0):
        self.model = model  # its weights are the base model's and never change
        self.rule = rule
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
        return ScoreResult(logprobs, kinds, words, stream, domain, applied, skipped)

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
        """Take the domains and streams of a saved state (its base model must be ours)."""
        try:
            cfg, vocab = self.model.config, self.model.vocab
            for name, d in payload["domains"].items():
                weights = weights_from_tensors(d["weights"], len(vocab), cfg.hidden, vocab.num_classes, where)
                self.domains[name] = Domain(weights, int(d["updates"]), int(d["skipped"]), _tally_from(d["tally"]))
            window = self.rule.window + 1
            for s in payload["streams"]:
                state = self.model.new_state(self.rule)
                for k in ("hidden", "inputs", "errors", "meta"):
                    array = s[k].numpy()
                    if k != "meta" and array.shape[0] != window:
                        raise CheckpointError(f"{where}: stream state window differs from this daemon's")
                    np.copyto(getattr(state, k), array)
                self.streams[(s["domain"], s["stream"])] = Stream(state, _tally_from(s["tally"]))
            self.evicted.update(payload.get("evicted", {}))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise CheckpointError(f"{where}: damaged daemon state ({err})") from None


def base_model_of(payload: dict, where: str) -> RNNLM:
    return model_from_payload(payload["model"], where)


def _tally_state(tally: Tally) -> dict:
    return {k: getattr(tally, k) for k in TALLY_FIELDS}


def _tally_from(state: dict) -> Tally:
    tally = Tally()
    for k in TALLY_FIELDS:
        setattr(tally, k, type(getattr(tally, k))(state[k]))
    return tally


def token_flags(kinds: np.ndarray) -> tuple[list[int], list[int]]:
    """Positions of OOV and rare tokens, as the reply lists them."""
    return np.flatnonzero(kinds == OOV).tolist(), np.flatnonzero(kinds == RARE_WORD).tolist()
