"""Linear interpolation of language models, word by word, over one token stream.

Mikolov et al. (2010) report their best numbers for mixtures: an RNN interpolated with a
Kneser–Ney 5-gram (0.75·RNN + 0.25·KN5), and several RNNs of different sizes and seeds, static or
dynamic, together. For every token w_i of the stream (the words of each line, then `</s>`, as
`rnnlm.corpus.read_tokens` gives them):

    P(w_i | history) = Σ_c λ_c P_c(w_i | history),        λ_c ≥ 0,  Σ_c λ_c = 1

computed in log space as logsumexp_c(ln λ_c + ln P_c(w_i)) over a (components × tokens) matrix
of ln P. Each RNN reads the whole stream (its hidden state runs on across sentence ends, as in
training); an n-gram restarts its history at `<s>` after every `</s>`. A *dynamic* RNN takes one
SGD step on its own loss after each word it scores (`OnlineRule`, the paper's dynamic model),
independently of the other components, starting from a copy of its weights.

Weights are given, or tuned by EM on a validation stream (the standard mixture-weight EM, as
SRILM's compute-best-mix and Mikolov's toolkit do): with r_ci = λ_c P_c(w_i) / Σ_d λ_d P_d(w_i)
the posterior that component c produced word i, the update λ_c ← mean_i r_ci never lowers the
validation likelihood, and stops when the mean ln-likelihood gains less than `tol` nats.

One event space for every component
-----------------------------------
A mixture of distributions is a distribution only if every component spreads its mass over the
*same* events. The components do not know the same words: an RNN names the words of its training
text (rare ones through eq. 7), an n-gram the words of its own, and each has a catch-all token
(`<unk>`, or the RNN's `<rare>`) for the rest. The common event space is therefore

    E = W ∪ {U},   W = every word some component knows by name (not <unk>, <s>, <rare>),
                   U = "a word no component knows" — the literal `<unk>` token and every
                       out-of-vocabulary word both map here.

For component c with named words K_c ⊆ W, the events it cannot tell apart are
L_c = (W − K_c) ∪ {U}, and its catch-all probability m_c(h) is shared evenly among them — the
same move as eq. 7 makes for rare words:

* **RNN** with `<unk>` in its vocabulary (PTB, WikiText): a known word gets its output
  probability, a rare word y_rare / C_rare (eq. 7), every event of L_c gets y_<unk> / |L_c|.
  Its distribution over E sums to 1 − y_rare when no word is rare (C_rare = 0: the `<rare>` unit
  then names no word, and its small, trained-toward-zero output is left unused — deficient,
  which can only make the mixture's perplexity pessimistic, never optimistic).
* **RNN** without `<unk>`: `<rare>` is the only catch-all, shared by the C_rare rare words and
  L_c: each gets y_rare / (C_rare + |L_c|). (Alone, `rnnlm eval` scores an OOV as one more rare
  word, y_rare / C_rare, which gives the rare words and the OOVs more than y_rare together; a
  mixture needs the honest split.)
* **n-gram** (ARPA): a word it knows gets P(w | h); every event of L_c gets P(<unk> | h) / |L_c|.
  A model without `<unk>` (closed vocabulary) gives them probability 0.

When all components were trained on the same text (the usual case: PTB's RNNs and KN5 both know
the same 9,999 words plus `</s>`), W − K_c is empty, |L_c| = 1, and every component scores
exactly as it does alone: `<unk>`-mapped OOVs are scored as `<unk>` by each. A token whose mixture
probability is 0 (only possible when no component has a catch-all) is left out of perplexity and
counted as `skipped`, as SRILM does. Reports count OOVs: per component, tokens it cannot name
(the literal `<unk>` excluded, since it is a word of the training text); for the mixture, tokens
no component can name.

N-best rescoring scores each hypothesis as a sentence on its own — the RNN from the state after
an implicit sentence end (s = 0.1), the n-gram from `<s>` — with static weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .corpus import EOS
from .evaluate import Tally, evaluate
from .model import FROZEN, RNNLM, OnlineRule
from .ngram import BOS, BackoffLM
from .vocab import KNOWN, OOV, RARE, RARE_WORD, UNK

NOT_EVENTS = frozenset({UNK, BOS, RARE})  # tokens that name no word of their own


# --------------------------------------------------------------------------------------------
# Components: ln P per token on the common event space
# --------------------------------------------------------------------------------------------


class RNNComponent:
    """An RNN model, static or dynamic (then `rule` is its online update)."""

    kind = "rnn"

    def __init__(self, model: RNNLM, name: str = "rnn", rule: OnlineRule | None = None):
        self.model, self.name = model, name
        self.rule = rule if rule is not None and rule.learn else None
        vocab = model.vocab
        self.known = frozenset(vocab.words).union(vocab.rare_words) - NOT_EVENTS

    @property
    def dynamic(self) -> bool:
        return self.rule is not None

    def logprobs(self, tokens: Sequence[str], lumped: int) -> np.ndarray:
        """ln P of each token, on the event space whose catch-all share is 1/`lumped`.

        A dynamic component adapts a copy of its weights as it goes; the model never changes.
        """
        per_word: list[float] = []
        if self.dynamic:
            evaluate(self.model, list(tokens), self.rule, weights=self.model.weights.copy(), per_word=per_word)
        else:
            evaluate(self.model, list(tokens), FROZEN, per_word=per_word)
        return np.asarray(per_word) + self.share_offsets(tokens, lumped)

    def sentence_logprobs(self, words: Sequence[str], lumped: int) -> np.ndarray:
        """ln P of each word and `</s>`, from a fresh state, static (for n-best rescoring)."""
        tokens = [*words, EOS]
        logp = self.model.score_words(tokens, self.model.new_state(), FROZEN)[0]
        return logp + self.share_offsets(tokens, lumped)

    def share_offsets(self, tokens: Sequence[str], lumped: int) -> np.ndarray:
        """What turns the vocabulary's scoring rule (rnnlm.vocab) into the mixture's, per token.

        With `<unk>`: tokens scored as `<unk>` get 1/|L_c| of it. Without: `<rare>` is shared by
        C_rare + |L_c| events instead of the vocabulary's C_rare (rare words) or max(C_rare, 1)
        (OOVs).
        """
        vocab = self.model.vocab
        ids, kinds = vocab.encode(tokens)
        if vocab.unk_id is not None:
            return np.where(ids == vocab.unk_id, -math.log(lumped), 0.0)
        rare = len(vocab.rare_words)  # rare words exist only when rare ≥ 1, so max() is theirs too
        return np.where(kinds != KNOWN, math.log(max(rare, 1)) - math.log(rare + lumped), 0.0)

    def counts(self, tokens: Sequence[str]) -> dict:
        kinds = self.model.vocab.encode(tokens)[1]
        return {"oov": int(np.count_nonzero(kinds == OOV)), "rare": int(np.count_nonzero(kinds == RARE_WORD))}


class NGramComponent:
    """A backoff model read from an ARPA file."""

    kind = "ngram"
    dynamic = False

    def __init__(self, lm: BackoffLM, name: str = "ngram"):
        self.lm, self.name = lm, name
        self.known = frozenset(lm.vocab) - NOT_EVENTS

    def logprobs(self, tokens: Sequence[str], lumped: int, history: list[int] | None = None) -> np.ndarray:
        """ln P of each token; a token it cannot name gets P(<unk> | h) / `lumped`.

        The stream starts at `<s>`, or continues from `history` (a stream's context, from
        `self.lm.new_history()`), which is left where the tokens end: the daemon scores a stream
        message by message this way, exactly as the whole stream at once.
        """
        known = self.known
        mapped = [t if t in known else UNK for t in tokens]
        logp = np.fromiter(self.lm.stream_logprobs(mapped, history), dtype=np.float64, count=len(mapped))
        caught = np.fromiter((t == UNK for t in mapped), dtype=bool, count=len(mapped))
        return np.where(caught, logp - math.log(lumped), logp)

    def sentence_logprobs(self, words: Sequence[str], lumped: int) -> np.ndarray:
        # The stream starts at <s> and the sentence ends the stream: the same as one sentence.
        return self.logprobs([*words, EOS], lumped)

    def counts(self, tokens: Sequence[str]) -> dict:
        return {"oov": sum(1 for t in tokens if t not in self.known and t != UNK)}


Component = RNNComponent | NGramComponent


# --------------------------------------------------------------------------------------------
# The mixture: log-sum-exp and EM
# --------------------------------------------------------------------------------------------


def mix_logprobs(logp: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """ln Σ_c λ_c P_c(w_i) for each token i, from the (components × tokens) matrix of ln P_c."""
    with np.errstate(divide="ignore"):
        joint = logp + np.log(np.asarray(weights, dtype=np.float64))[:, None]
    top = joint.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(joint - safe).sum(axis=0))


@dataclass
class EMResult:
    weights: np.ndarray
    iterations: int
    perplexity: float  # of the tuning stream under the final weights
    history: list[float] = field(default_factory=list)  # mean ln-likelihood per iteration


def em_weights(logp: np.ndarray, weights: Sequence[float] | None = None, tol: float = 1e-7,
               max_iter: int = 500) -> EMResult:
    """Mixture weights maximising the likelihood of the tokens in `logp` (components × tokens).

    E-step: r_ci = λ_c P_c(w_i) / Σ_d λ_d P_d(w_i); M-step: λ_c = mean_i r_ci. Tokens that every
    component gives probability 0 carry no information and are left out.
    """
    count = logp.shape[0]
    lam = np.full(count, 1.0 / count) if weights is None else normalise(weights)
    usable = logp[:, np.isfinite(mix_logprobs(logp, np.full(count, 1.0 / count)))]
    history: list[float] = []
    for iteration in range(1, max_iter + 1):
        with np.errstate(divide="ignore"):
            joint = usable + np.log(lam)[:, None]
        total = mix_logprobs(usable, lam)
        history.append(float(total.mean()))
        lam = np.exp(joint - total).mean(axis=1)
        lam /= lam.sum()
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
    final = float(mix_logprobs(usable, lam).mean())
    return EMResult(lam, iteration, math.exp(-final), history)


DEFAULT_NGRAM_WEIGHT = 0.25  # the classic 0.75·RNN + 0.25·KN5


def default_weights(rnn_count: int, has_ngram: bool, ngram_weight: float = DEFAULT_NGRAM_WEIGHT) -> list[float]:
    """Mixture weights when none are given: the n-gram gets `ngram_weight`, the RNNs share the rest."""
    if not rnn_count:
        return [1.0]
    kn = ngram_weight if has_ngram else 0.0
    return [(1.0 - kn) / rnn_count] * rnn_count + ([kn] if has_ngram else [])


def normalise(weights: Sequence[float]) -> np.ndarray:
    """Weights as an array summing to one; they must be non-negative and sum to 1 (±0.001)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("mixture weights must be non-negative numbers")
    if abs(w.sum() - 1.0) > 1e-3:
        raise ValueError(f"mixture weights must sum to 1 (they sum to {w.sum():.4g})")
    return w / w.sum()


@dataclass
class MixtureScore:
    """What scoring a stream gave: the mixture's totals and each component's on the same tokens."""

    tally: Tally  # the mixture (words = tokens scored, </s> included)
    weights: np.ndarray
    components: list[dict]  # name, kind, dynamic, weight, perplexity, oov, ...
    skipped: int  # tokens no component could give any probability (closed vocabularies only)
    logp: np.ndarray  # (components × tokens) ln P, for tuning or inspection
    known: Tally = field(default_factory=Tally)  # the mixture over tokens some component knows by name


class Mixture:
    """Components on one event space, and their weights (uniform unless given)."""

    def __init__(self, components: Sequence[Component], weights: Sequence[float] | None = None):
        if not components:
            raise ValueError("a mixture needs at least one model")
        self.components = list(components)
        self.words = frozenset().union(*(c.known for c in self.components))  # W
        self.lumped = [len(self.words - c.known) + 1 for c in self.components]  # |L_c|
        count = len(self.components)
        self.weights = np.full(count, 1.0 / count) if weights is None else normalise(weights)
        if len(self.weights) != count:
            raise ValueError(f"{len(self.weights)} weights given for {count} models")

    def logprob_matrix(self, tokens: Sequence[str]) -> tuple[np.ndarray, list[float]]:
        """(components × tokens) ln P, dynamic components adapting; and seconds per component."""
        rows, seconds = [], []
        for component, lumped in zip(self.components, self.lumped):
            start = time.perf_counter()
            rows.append(component.logprobs(tokens, lumped))
            seconds.append(time.perf_counter() - start)
        return np.vstack(rows), seconds

    def tune(self, tokens: Sequence[str], **em_options) -> EMResult:
        """Set the weights by EM on `tokens` (a validation stream, never the test text)."""
        result = em_weights(self.logprob_matrix(tokens)[0], self.weights, **em_options)
        self.weights = result.weights
        return result

    def score(self, tokens: Sequence[str]) -> MixtureScore:
        logp, seconds = self.logprob_matrix(tokens)
        return self.summarise(logp, tokens, seconds)

    def summarise(self, logp: np.ndarray, tokens: Sequence[str], seconds: Sequence[float] = ()) -> MixtureScore:
        """Totals for the mixture and for each component, over the tokens the mixture can score."""
        mixed = mix_logprobs(logp, self.weights)
        scored = np.isfinite(mixed)
        tally = Tally(words=int(scored.sum()), loss_nats=-float(mixed[scored].sum()), seconds=float(sum(seconds)))
        tally.oov = sum(1 for t in tokens if t not in self.words and t != UNK)
        parts = []
        for c, component in enumerate(self.components):
            loss = -float(logp[c, scored].sum())
            parts.append({
                "name": component.name, "kind": component.kind, "dynamic": component.dynamic,
                "weight": float(self.weights[c]),
                "perplexity": math.exp(loss / tally.words) if tally.words and math.isfinite(loss) else math.inf,
                "loss_nats": loss, "lumped_events": self.lumped[c],
                "seconds": seconds[c] if c < len(seconds) else None,
                **component.counts(tokens),
            })
        tally.rare = next((p["rare"] for p in parts if "rare" in p), 0)
        return MixtureScore(tally, self.weights.copy(), parts, len(tokens) - tally.words, logp,
                            self.known_tally(mixed, scored, tokens))

    def known_tally(self, mixed: np.ndarray, scored: np.ndarray, tokens: Sequence[str]) -> Tally:
        """The mixture over the tokens of W only: the literal `<unk>` and OOVs left out, as KenLM's
        "perplexity excluding OOVs" counts (the words after them are still scored in their context)."""
        known = scored & np.fromiter((t in self.words for t in tokens), dtype=bool, count=len(tokens))
        return Tally(words=int(known.sum()), loss_nats=-float(mixed[known].sum()))

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """Total ln P of a sentence and its `</s>` under the mixture (an n-best `lm_scorer`)."""
        logp = np.vstack([c.sentence_logprobs(words, n) for c, n in zip(self.components, self.lumped)])
        return float(mix_logprobs(logp, self.weights).sum())
