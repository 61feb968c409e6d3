"""The daemon's mixture: extra RNN models and an ARPA n-gram that take part in every score.

`rnnlm serve --extra-model b.pt --ngram kn5.arpa` interpolates, word by word, the primary RNN (the
Learner's model), the extra RNNs and the n-gram, exactly as `rnnlm eval` does offline with dynamic
components (rnnlm.mixture: one event space, ln P = logsumexp_c(ln λ_c + ln P_c)):

* every RNN adapts per domain with the daemon's online rule — each domain holds adapted weights for
  every RNN, each stream a hidden state per RNN — and each token is scored before any update;
* the n-gram does not learn; each stream keeps its history (the last order-1 words, back to `<s>`
  after `</s>`), carried from one message to the next, so a stream sent in pieces — sentences split
  across `tokens` messages included — scores exactly like the whole text at once.

The reply's `logprobs`, `loss` and `stream_perplexity` are the mixture's; `rnn_logprobs` and
`rnn_loss` are the primary RNN's own, as the daemon would answer without the mixture.

A checkpoint records which extra models and n-gram the state belongs to (a content digest of each),
so a restart with a different set is refused instead of mixing state from different models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rnnlm.checkpoint import CheckpointError, load_model
from rnnlm.mixture import Mixture, NGramComponent, RNNComponent, mix_logprobs
from rnnlm.model import RNNLM, OnlineRule, StreamState, Weights
from rnnlm.ngram import BackoffLM, read_arpa


@dataclass
class Parts:
    """What `--extra-model` and `--ngram` loaded (once, before any checkpoint is looked at)."""

    extras: list[tuple[str, RNNLM]]  # (file, model), in command-line order
    ngram: tuple[str, BackoffLM] | None
    weights: list[float]  # primary RNN, extra RNNs in order, then the n-gram
    fingerprints: list[dict]  # one per extra model, then the n-gram: kind, name, digest

    @classmethod
    def load(cls, extra_files: Sequence[str], ngram_file: str | None, weights: Sequence[float]) -> "Parts":
        extras = [(path, load_model(path)) for path in extra_files]
        ngram = (ngram_file, read_arpa(ngram_file)) if ngram_file else None
        prints = [{"kind": "rnn", "name": path, "digest": rnn_digest(model)} for path, model in extras]
        if ngram:
            prints.append({"kind": "ngram", "name": ngram[0], "digest": ngram_digest(ngram[1])})
        return cls(extras, ngram, list(weights), prints)


class Combination:
    """The mixture a Learner scores with: its primary model plus the loaded parts."""

    def __init__(self, primary: RNNLM, primary_name: str, parts: Parts):
        rnns = [RNNComponent(primary, primary_name), *(RNNComponent(m, name) for name, m in parts.extras)]
        components: list = list(rnns)
        if parts.ngram is not None:
            components.append(NGramComponent(parts.ngram[1], parts.ngram[0]))
        self.mixture = Mixture(components, parts.weights)  # the event space (lumped shares) and weights
        self.parts = parts
        self.extras = [model for _, model in parts.extras]
        self.rnns = rnns
        self.ngram: NGramComponent | None = components[-1] if parts.ngram is not None else None
        self.weights = self.mixture.weights
        lumped = self.mixture.lumped
        # An RNN scores exactly as alone when it has <unk> and names every word of the event space;
        # only otherwise does share_offsets change anything (and cost an encode per message).
        self.shared = [c.model.vocab.unk_id is None or n > 1 for c, n in zip(rnns, lumped)]
        self.lumped = lumped
        if not any(w > 0 for w in self.weights[: len(rnns)]) and self.ngram is not None and parts.ngram[1].unk is None:
            raise ValueError("every RNN has weight 0 and the n-gram has no <unk>: an unknown word would get "
                             "probability 0")

    @property
    def fingerprints(self) -> list[dict]:
        return self.parts.fingerprints

    def describe(self) -> list[dict]:
        """name, kind, weight of each component, primary first (info op, model_info metric)."""
        return [{"name": c.name, "kind": c.kind, "weight": float(w)} for c, w in zip(self.mixture.components, self.weights)]

    # --- per stream / domain state -----------------------------------------------------------------

    def new_weights(self) -> list[Weights]:
        return [m.weights.adapted_copy() for m in self.extras]

    def new_states(self, rule: OnlineRule) -> list[StreamState]:
        return [m.new_state(rule) for m in self.extras]

    def new_history(self) -> list[int] | None:
        return self.ngram.lm.new_history() if self.ngram is not None else None

    # --- scoring -----------------------------------------------------------------------------------

    def score(self, words: list[str], primary: np.ndarray, weights: list[Weights], states: list[StreamState],
              history: list[int] | None, rule: OnlineRule) -> tuple[np.ndarray, list[int]]:
        """The mixture's ln P per word, given the primary RNN's (already scored); the extra RNNs
        score (then learn, under `rule`) with a domain's `weights` and a stream's `states`, the
        n-gram continues from the stream's `history`. Returns it and each extra's updates applied."""
        rows = [self._shared(0, words, primary)]
        applied = []
        for j, model in enumerate(self.extras):
            logp, _, learned = model.score_words(words, states[j], rule, weights[j])
            rows.append(self._shared(j + 1, words, logp))
            applied.append(learned)
        if self.ngram is not None:
            rows.append(self.ngram.logprobs(words, self.lumped[-1], history))
        return mix_logprobs(np.vstack(rows), self.weights), applied

    def _shared(self, c: int, words: list[str], logp: np.ndarray) -> np.ndarray:
        return logp + self.rnns[c].share_offsets(words, self.lumped[c]) if self.shared[c] else logp

    # --- checkpoints -------------------------------------------------------------------------------

    def check_history(self, ids: np.ndarray, where: str) -> list[int]:
        """A saved n-gram history: up to order-1 word ids of the n-gram's vocabulary (or its
        no-<unk> id, one past the last)."""
        lm = self.ngram.lm
        if ids.ndim != 1 or len(ids) > lm.order - 1 or not np.all((ids >= 0) & (ids <= len(lm.vocab))):
            raise CheckpointError(f"{where}: a stream's n-gram history is not up to {lm.order - 1} word ids "
                                  "of the n-gram's vocabulary")
        return [int(i) for i in ids]

    def saved_history(self, history: list[int]) -> list[int]:
        """What a checkpoint keeps of a history: the last order-1 ids (all that scoring reads)."""
        keep = self.ngram.lm.order - 1
        return history[len(history) - keep:] if keep else []


def rnn_digest(model: RNNLM) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(model.vocab.words).encode())
    h.update(f"|{model.config.hidden}|{model.vocab.num_classes}|".encode())
    h.update("\n".join(sorted(model.vocab.rare_words)).encode())
    for array in model.weights.arrays().values():
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def ngram_digest(lm: BackoffLM) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(lm.vocab).encode())
    for table in lm.tables:
        for array in (table.ids, table.logprob10, table.backoff10):
            h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def saved_fingerprints(payload: dict, where: str) -> list[dict]:
    """The extra models and n-gram a daemon state was written with ([] for a plain daemon's)."""
    prints = payload.get("components", [])
    if not isinstance(prints, list) or not all(
            isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("kind", "name", "digest")) for p in prints):
        raise CheckpointError(f"{where}: damaged list of combined models")
    return prints


def same_components(a: list[dict], b: list[dict]) -> bool:
    return [(p["kind"], p["digest"]) for p in a] == [(p["kind"], p["digest"]) for p in b]


def describe_components(prints: list[dict]) -> str:
    if not prints:
        return "no extra model and no n-gram"
    return ", ".join(f"{p['name']} ({p['kind']})" for p in prints)
