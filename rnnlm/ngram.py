"""Backoff n-gram language models: ARPA files, fast scoring, modified Kneser–Ney estimation.

The RNN model is combined with a 5-gram Kneser–Ney model (Mikolov et al. 2010: 0.75·RNN +
0.25·KN5), and users may bring their own SRILM or KenLM model, so this module has three parts:

1. `BackoffLM`, a backoff model of any order as an ARPA file describes it, with fast scoring.
2. `read_arpa` / `write_arpa`, the ARPA text format as SRILM and KenLM write it.
3. `build_kneser_ney`, interpolated modified Kneser–Ney estimation (Chen & Goodman 1998,
   "An empirical study of smoothing techniques for language modeling", TR-10-98, section 3),
   made to give the same model as KenLM's `lmplz` (Heafield et al. 2013).

Backoff rule
------------
An ARPA model stores, for every n-gram it knows, log10 P(w | h) and, for n-grams that are also
histories, a log10 backoff weight bow(h). For a word w after history h = h_1 … h_m:

    P(w | h) = P_arpa(h_j … h_m w) · Π_{i<j} bow(h_i … h_m)

where h_j … h_m w is the longest suffix of h·w the model stores and the product runs over the
longer histories (only those the model stores; a missing history has bow = 1). All probabilities
this module returns are natural logs (ln); the ARPA file keeps log10.

Vocabulary and unknown words
----------------------------
Words are open-vocabulary: a word the model does not know is scored as `<unk>`. A model without a
`<unk>` unigram (a closed-vocabulary model) gives an unknown word probability 0, i.e. a log
probability of -inf, and `score_corpus` then leaves that word out of perplexity and counts it as an
OOV, as SRILM's `ngram -ppl` does. As a history, an unknown word matches no n-gram, so the next
word backs off past it. `<s>` is never predicted (log10 -99, as in SRILM and KenLM files).
"""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .atomic import atomic_file
from .evaluate import Tally

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LN10 = math.log(10.0)
ARPA_ZERO = -99.0  # how ARPA files write log10 0 (the probability of predicting <s>)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class NGramTable:
    """All n-grams of one order n.

    ids:        (count, n) int32 word ids, the words of each n-gram left to right.
    logprob10:  (count,) log10 P(last word | the n-1 words before it), as in the ARPA file.
    backoff10:  (count,) log10 backoff weight of the n-gram as a history; 0.0 (bow = 1) when the
                n-gram is not a history or the file gave no backoff column.
    """

    ids: np.ndarray
    logprob10: np.ndarray
    backoff10: np.ndarray

    def __len__(self) -> int:
        return len(self.logprob10)


class BackoffLM:
    """A backoff n-gram language model (the ARPA model of any order).

    `vocab` lists the words; a word's id is its position. `tables[n-1]` holds the n-grams of
    order n (unigram table: one row per vocabulary word, in id order).

    Scoring uses one dict per order that maps an n-gram, packed into one Python int
    (ids as digits in base len(vocab)+1, first word most significant), to its ln probability,
    and one more per order from history to ln backoff weight. Packing keeps the dicts small and
    lets a lookup extend a history one word to the left with one multiply-add.
    """

    def __init__(self, vocab: Sequence[str], tables: Sequence[NGramTable]):
        if not tables:
            raise ValueError("a backoff model needs at least unigrams")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("duplicate words in the vocabulary")
        unigram_ids = tables[0].ids[:, 0]
        if len(unigram_ids) != len(self.vocab) or not np.array_equal(unigram_ids, np.arange(len(self.vocab))):
            raise ValueError("the unigram table must list every vocabulary word once, in id order")
        for name in (BOS, EOS):
            if name not in self.index:
                raise ValueError(f"the model has no {name} unigram")
        self.tables = list(tables)
        self.order = len(self.tables)
        self.bos = self.index[BOS]
        self.eos = self.index[EOS]
        self.unk = self.index.get(UNK)
        # An unknown word maps to <unk>; without <unk> to an id that no n-gram uses.
        self.oov_id = self.unk if self.unk is not None else len(self.vocab)
        self._base = len(self.vocab) + 1
        # (D1, D2, D3+) per order when the model was estimated here; None when read from a file.
        self.discounts: list[tuple[float, float, float]] | None = None
        self._build_index()

    # -- lookups ------------------------------------------------------------------------------

    def _build_index(self) -> None:
        self._probs: list[dict[int, float]] = []
        self._bows: list[dict[int, float]] = []
        for n, table in enumerate(self.tables, start=1):
            keys = _pack_rows(table.ids, self._base)
            probs = dict(zip(keys, (table.logprob10 * LN10).tolist()))
            if len(probs) != len(keys):
                raise ValueError(f"the model lists some {n}-gram more than once")
            has_bow = np.flatnonzero(table.backoff10 != 0.0)
            bows = dict(zip([keys[i] for i in has_bow.tolist()], (table.backoff10[has_bow] * LN10).tolist()))
            self._probs.append(probs)
            self._bows.append(bows)

    def word_id(self, word: str) -> int:
        """The id used for `word`: its own, `<unk>`'s when unknown, or an id no n-gram has."""
        return self.index.get(word, self.oov_id)

    def is_known(self, word: str) -> bool:
        """Whether `word` is in the model's vocabulary (`<unk>` counts as known if listed)."""
        return word in self.index

    def logprob_ids(self, word: int, history: Sequence[int]) -> float:
        """ln P(word | history) for word ids; the history's last element is the previous word.

        Walks histories from short to long (h_m, then h_{m-1} h_m, ...), as long as the model
        stores them. The deepest stored n-gram "history + word" gives the probability; the
        backoff weights of the stored histories longer than that one are added (in log space).
        """
        probs, bows, base = self._probs, self._bows, self._base
        logprob = probs[0].get(word)
        if logprob is None:  # only for unknown words in a model without <unk>
            return -math.inf
        context = 0  # the history suffix of length n, packed
        scale = 1  # base ** (n - 1): where the next word to the left goes
        backoff = 0.0  # ln bow summed over stored histories longer than the best match
        for n in range(1, min(self.order, len(history) + 1)):
            context += history[-n] * scale
            scale *= base
            if context not in probs[n - 1]:
                break  # histories are suffix-closed: a longer one cannot be stored either
            backoff += bows[n - 1].get(context, 0.0)
            found = probs[n].get(context * base + word)
            if found is not None:
                logprob, backoff = found, 0.0
        return logprob + backoff

    def logprob(self, word: str, history: tuple[str, ...] | Sequence[str] = ()) -> float:
        """Natural-log probability of `word` after `history` (oldest word first).

        Start a sentence with history `("<s>",)`. Unknown words are scored as `<unk>` (see the
        module docstring for models without `<unk>`).
        """
        recent = history[max(0, len(history) - (self.order - 1)) :] if self.order > 1 else ()
        return self.logprob_ids(self.word_id(word), [self.word_id(w) for w in recent])

    def sentence_logprobs(self, words: Sequence[str]) -> list[float]:
        """ln P of each word of a sentence and then of `</s>`, the history starting at `<s>`."""
        ids = [self.word_id(w) for w in words]
        ids.append(self.eos)
        history = [self.bos]
        out = []
        score = self.logprob_ids
        for w in ids:
            out.append(score(w, history))
            history.append(w)
        return out

    def new_history(self) -> list[int]:
        """The history of a stream that has not started yet: `<s>`."""
        return [self.bos]

    def stream_logprobs(self, tokens: Iterable[str], history: list[int] | None = None) -> Iterator[float]:
        """ln P of each token of a running text in which `</s>` ends each sentence.

        The token stream the RNN side reads (`rnnlm.corpus.read_tokens`) has this shape, so the
        two models' per-word probabilities line up for interpolation. The history restarts at
        `<s>` after every `</s>` (and at the start).

        `history` (word ids, oldest first, from `new_history`) lets a stream be scored in pieces:
        scoring starts from it and leaves it, in place, where the tokens end (it keeps at least the
        last order-1 ids), so pieces score exactly as the whole text would.
        """
        if history is None:
            history = self.new_history()
        keep = self.order - 1
        score, word_id, eos = self.logprob_ids, self.word_id, self.eos
        for token in tokens:
            w = word_id(token)
            logprob = score(w, history)
            # The history moves on before the yield: a consumer that stops after the last token
            # (np.fromiter with a count) leaves it where the tokens end.
            if w == eos:
                history[:] = (self.bos,)
            else:
                history.append(w)
                if len(history) > 2 * keep + 8:  # trim now and then, not every word
                    del history[: len(history) - keep]
            yield logprob

    def sentence_logprob(self, words: Sequence[str]) -> float:
        """Total ln P of a sentence including `</s>` (an `lm_scorer` for n-best rescoring)."""
        return math.fsum(self.sentence_logprobs(words))

    @property
    def counts(self) -> list[int]:
        """Number of n-grams per order (unigrams first)."""
        return [len(t) for t in self.tables]


def _pack_rows(ids: np.ndarray, base: int) -> list[int]:
    """Pack each row of word ids into one Python int (base-`base` digits, first word high).

    Uses int64 arithmetic while base**n fits (most orders); longer rows are split and joined
    with Python ints, which are unbounded.
    """
    n = ids.shape[1]
    fits = 1
    while fits < n and base ** (fits + 1) < 2**63:
        fits += 1
    if n <= fits:
        keys = ids[:, 0].astype(np.int64)
        for j in range(1, n):
            keys = keys * base + ids[:, j]
        return keys.tolist()
    high = _pack_rows(ids[:, : n - fits], base)
    low = _pack_rows(ids[:, n - fits :], base)
    shift = base**fits
    return [h * shift + l for h, l in zip(high, low)]


# --------------------------------------------------------------------------------------------
# Corpus scoring
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusScore(Tally):
    """Totals of scoring a corpus (a Tally: perplexity and entropy follow from the same rule as the
    RNN's): `words` counts every scored token, `</s>` included.

    OOV tokens (words not in the model's vocabulary) are counted in `oov`. With a `<unk>` entry
    they are scored as `<unk>` and included in `loss_nats` and `words` (open vocabulary; PTB's own
    `<unk>` token is an ordinary, known word); without one they are left out of both.
    """

    sentences: int = 0

    @property
    def logprob(self) -> float:
        """Total ln P, as SRILM and KenLM report it (the tally keeps -ln P)."""
        return -self.loss_nats


def score_corpus(lm: BackoffLM, sentences: Iterable[Sequence[str]]) -> CorpusScore:
    """Score sentences (token lists without `</s>`) and total them for perplexity."""
    start = time.perf_counter()
    total, words, oov, count = 0.0, 0, 0, 0
    for sentence in sentences:
        count += 1
        oov += sum(1 for w in sentence if not lm.is_known(w))
        for lp in lm.sentence_logprobs(sentence):
            if lp != -math.inf:
                total += lp
                words += 1
    return CorpusScore(words=words, oov=oov, loss_nats=-total, seconds=time.perf_counter() - start, sentences=count)


# --------------------------------------------------------------------------------------------
# ARPA files
# --------------------------------------------------------------------------------------------


def read_arpa(path: str | Path) -> BackoffLM:
    """Read an ARPA backoff model (as SRILM `ngram-count` or KenLM `lmplz` write it).

    Layout: optional text, a `\\data\\` line, `ngram N=COUNT` lines, then for each order a
    `\\N-grams:` section of COUNT lines `LOG10PROB WORD_1 ... WORD_N [LOG10BACKOFF]`
    (fields separated by spaces or tabs), blank lines between sections, and `\\end\\`.
    Raises ValueError naming the line for anything malformed.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return _parse_arpa(f, str(path))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def _parse_arpa(lines: Iterable[str], name: str) -> BackoffLM:
    numbered = enumerate(lines, start=1)

    def fail(lineno: int | None, message: str) -> ValueError:
        return ValueError(f"{name}:{lineno}: {message}" if lineno else f"{name}: {message}")

    # Header: everything before \data\ is ignored (the ARPA convention).
    for lineno, line in numbered:
        if line.strip() == "\\data\\":
            break
    else:
        raise fail(None, "no \\data\\ line: not an ARPA file")
    declared: list[int] = []
    item = _next_nonblank(numbered)
    while item is not None and item[1].startswith("ngram "):
        lineno, line = item
        order_text, _, count_text = line[len("ngram ") :].partition("=")
        try:
            order, count = int(order_text), int(count_text)
        except ValueError:
            raise fail(lineno, f"bad count line {line!r} (expected 'ngram N=COUNT')") from None
        if order != len(declared) + 1 or count < 0:
            raise fail(lineno, f"bad count line {line!r} (orders must be 1, 2, 3, ... in turn)")
        declared.append(count)
        item = _next_nonblank(numbered)
    if not declared:
        raise fail(item[0] if item else None, "no 'ngram N=COUNT' lines after \\data\\")

    index: dict[str, int] = {}
    tables: list[NGramTable] = []
    for order, count in enumerate(declared, start=1):
        if item is None or item[1] != f"\\{order}-grams:":
            found = f", found {item[1]!r}" if item else " (file truncated?)"
            raise fail(item[0] if item else None, f"expected the \\{order}-grams: section{found}")
        try:
            table, item = _read_section(numbered, order, index)
        except _BadLine as bad:
            raise fail(bad.lineno, _diagnose(bad.line, order, index)) from None
        if len(table) != count:
            raise fail(item[0] if item else None, f"\\data\\ declares {count} {order}-grams but the section has {len(table)}")
        tables.append(table)
    if item is None or item[1] != "\\end\\":
        found = f", found {item[1]!r}" if item else " (file truncated?)"
        raise fail(item[0] if item else None, f"expected \\end\\ after the last section{found}")
    try:
        return BackoffLM(list(index), tables)
    except ValueError as err:
        raise fail(None, str(err)) from None


class _BadLine(Exception):
    def __init__(self, lineno: int, line: str):
        self.lineno, self.line = lineno, line


def _next_nonblank(numbered) -> tuple[int, str] | None:
    for lineno, line in numbered:
        line = line.strip()
        if line:
            return lineno, line
    return None


def _read_section(numbered, order: int, index: dict[str, int]) -> tuple[NGramTable, tuple[int, str] | None]:
    """Read one \\N-grams: section up to the next line starting with a backslash (returned).

    This loop is the hot path of loading a big model, so it does as little as it can per line;
    a bad line raises `_BadLine` and `_diagnose` works out what is wrong with it.
    """
    ids: list[int] = []
    probs: list[float] = []
    bows: list[float] = []
    item = None
    plain, with_bow = order + 1, order + 2
    lineno, line = 0, ""
    try:
        for lineno, line in numbered:
            fields = line.split()
            size = len(fields)
            if size == plain:
                bow = 0.0
                words = fields[1:]
            elif size == with_bow:
                bow = float(fields[-1])
                words = fields[1:-1]
            elif size == 0:
                continue
            elif fields[0].startswith("\\"):
                item = (lineno, line.strip())
                break
            else:
                raise _BadLine(lineno, line)
            prob = float(fields[0])
            # `not prob <= 0` is also true for NaN; a backoff weight must be finite.
            if not prob <= 0.0 or not -math.inf < bow < math.inf:
                raise _BadLine(lineno, line)
            if order == 1:
                if words[0] in index:
                    raise _BadLine(lineno, line)
                index[words[0]] = len(index)
                ids.append(index[words[0]])
            else:
                ids.extend([index[w] for w in words])
            probs.append(prob)
            bows.append(bow)
    except (ValueError, KeyError):
        raise _BadLine(lineno, line) from None
    logprob10 = np.maximum(np.array(probs, dtype=np.float64), ARPA_ZERO)  # -inf, below -99: probability 0
    ids_array = np.array(ids, dtype=np.int32).reshape(len(probs), order)
    return NGramTable(ids_array, logprob10, np.array(bows, dtype=np.float64)), item


def _diagnose(line: str, order: int, index: dict[str, int]) -> str:
    """Say what is wrong with a line that `_read_section` rejected."""
    fields = line.split()
    if len(fields) not in (order + 1, order + 2):
        return f"a {order}-gram line needs {order + 1} fields (or {order + 2} with a backoff weight), got {len(fields)}"
    numbers = [("log10 probability", fields[0])]
    if len(fields) == order + 2:
        numbers.append(("backoff weight", fields[-1]))
    for what, text in numbers:
        try:
            value = float(text)
        except ValueError:
            return f"{what} {text!r} is not a number"
        if value != value or value == math.inf or (what == "backoff weight" and value == -math.inf):
            return f"{what} {text!r} is not a usable number"
        if what == "log10 probability" and value > 0.0:
            return f"log10 probability {text} is positive"
    words = fields[1 : order + 1]
    if order == 1:
        return f"unigram {words[0]!r} is listed twice"
    unknown = [w for w in words if w not in index]
    if unknown:
        return f"word {unknown[0]!r} is not among the unigrams"
    return "malformed line"


def write_arpa(lm: BackoffLM, path: str | Path) -> None:
    """Write `lm` as an ARPA file, atomically (temp file in the same directory, then rename).

    Numbers are written with Python's shortest round-trip repr, so reading the file back gives
    bit-identical probabilities. Backoff columns are written only where bow != 1.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(path.parent))
    with atomic_file(path, text=True) as f:
        f.write("\\data\\\n")
        for n, table in enumerate(lm.tables, start=1):
            f.write(f"ngram {n}={len(table)}\n")
        words = np.array(lm.vocab, dtype=object)
        for n, table in enumerate(lm.tables, start=1):
            f.write(f"\n\\{n}-grams:\n")
            _write_section(f, table, words)
        f.write("\n\\end\\\n")


def _write_section(f, table: NGramTable, words: np.ndarray, chunk: int = 200_000) -> None:
    for start in range(0, len(table), chunk):
        stop = start + chunk
        columns = [words[table.ids[start:stop, j]] for j in range(table.ids.shape[1])]
        names = map(" ".join, zip(*columns)) if len(columns) > 1 else columns[0].tolist()
        probs = table.logprob10[start:stop].tolist()
        bows = table.backoff10[start:stop].tolist()
        f.write(
            "".join(
                f"{p!r}\t{w}\t{b!r}\n" if b != 0.0 else f"{p!r}\t{w}\n" for p, w, b in zip(probs, names, bows)
            )
        )


# --------------------------------------------------------------------------------------------
# Modified Kneser–Ney estimation
# --------------------------------------------------------------------------------------------


@dataclass
class _Level:
    """The distinct n-grams of one order, as built by `_count_ngrams`.

    context: id of the (n-1)-gram prefix in the previous level (0 for unigrams).
    word:    last word id.
    suffix:  id of the (n-1)-gram suffix (words 2..n) in the previous level (unused for n=1).
    raw:     how often the n-gram occurs in the text.
    first:   id of the first word.
    """

    context: np.ndarray
    word: np.ndarray
    suffix: np.ndarray
    raw: np.ndarray
    first: np.ndarray


def build_kneser_ney(
    sentences: Iterable[Sequence[str]],
    order: int = 5,
    discounts: Sequence[Sequence[float]] | None = None,
    log: Callable[[str], None] | None = None,
) -> BackoffLM:
    """Estimate an interpolated modified Kneser–Ney model (Chen & Goodman 1998) like KenLM's lmplz.

    Each sentence is wrapped in `<s>` … `</s>`; `<unk>` in the text is an ordinary word. No
    n-gram is pruned. The recipe, for each order n (Chen & Goodman, sections 3 and 4.1.6):

    * Adjusted counts a(·). Highest order: the raw count. Lower orders: the number of distinct
      words seen before the n-gram (the continuation count N1+(• w_1..w_n)), except that an
      n-gram starting with `<s>` keeps its raw count, since nothing can precede `<s>` (lmplz and
      SRILM do the same). `<s>` itself gets a(<s>) = 0: it is never predicted.
    * Three discounts from the count-of-counts n_1..n_4 of the adjusted counts of that order
      (their eq. 26): Y = n_1 / (n_1 + 2 n_2), D_1 = 1 − 2Y n_2/n_1, D_2 = 2 − 3Y n_3/n_2,
      D_3+ = 3 − 4Y n_4/n_3. Pass `discounts` (one (D_1, D_2, D_3+) per order, unigrams
      first) to override; when the data are too small for the formula (some n_k = 0, or a D out
      of range, where lmplz gives up) we fall back to D_1 = D_2 = D_3+ = Y, or 0.5 without Y.
    * For a history h with children w (h·w seen), a(h·w) − D(a(h·w)) is kept and the discounted
      mass goes to the lower order:
          p(w | h) = (a(h w) − D(a(h w))) / Σ_v a(h v)  +  γ(h) · p(w | h'),
          γ(h)     = (D_1 N_1(h •) + D_2 N_2(h •) + D_3+ N_3+(h •)) / Σ_v a(h v),
      with h' = h minus its first word, N_k(h •) the number of children with adjusted count k
      (3 or more for N_3+), and at the bottom p(w | empty) interpolated with the uniform
      distribution 1/|V| over the vocabulary (|V| counts `<unk>` but not `<s>`).
    * `<unk>`, if the text never has it, gets a(<unk>) = 0, so p(<unk>) = γ(empty)/|V|: only its
      share of the uniform distribution, exactly what lmplz gives it.

    As a backoff model: the ARPA probability of a seen h·w is the interpolated p(w | h), and
    bow(h) = γ(h), because an unseen w gets exactly γ(h) · p(w | h'). Each history's
    distribution therefore sums to 1 (tests check it).

    Counting uses numpy only: each n-gram is numbered by `np.unique` over
    (id of its (n-1)-gram prefix) · V + (last word), so no n-gram is ever a Python object.
    """
    if order < 1:
        raise ValueError("order must be at least 1")
    say = log or (lambda message: None)
    start = time.perf_counter()
    vocab, tokens = _encode(sentences)
    if len(tokens) == 0:
        raise ValueError("no sentences to train on")
    say(f"read {int((tokens == 1).sum()):,} sentences, {len(tokens):,} tokens with <s> and </s>, "
        f"{len(vocab):,} word types ({time.perf_counter() - start:.1f} s)")
    levels = _count_ngrams(tokens, order, len(vocab))
    say("distinct n-grams: " + ", ".join(f"{n}={len(l.raw):,}" for n, l in enumerate(levels, 1))
        + f" ({time.perf_counter() - start:.1f} s)")
    adjusted = _adjusted_counts(levels, bos=vocab.index(BOS))
    if discounts is None:
        discounts = [_discounts(a) for a in adjusted]
    elif len(discounts) != order or any(len(d) != 3 for d in discounts):
        raise ValueError(f"discounts needs one (D1, D2, D3+) triple per order ({order})")
    elif not all(0 < dk <= k for d in discounts for k, dk in enumerate(d, start=1)):
        # D = 0 would leave no mass for unseen words; D_k > k would make probabilities negative.
        raise ValueError("each discount D_k must satisfy 0 < D_k <= k")
    for n, d in enumerate(discounts, 1):
        say(f"order {n} discounts D1={d[0]:.4f} D2={d[1]:.4f} D3+={d[2]:.4f}")
    tables = _interpolate(levels, adjusted, discounts, bos=vocab.index(BOS))
    lm = BackoffLM(vocab, tables)
    lm.discounts = [tuple(float(x) for x in d) for d in discounts]
    say(f"estimated in {time.perf_counter() - start:.1f} s")
    return lm


def _encode(sentences: Iterable[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Word ids for the whole text, each sentence as <s> w_1 … w_k </s>; ids 0,1,2 = <unk>,<s>,</s>."""
    index = {UNK: 0, BOS: 1, EOS: 2}
    tokens: list[int] = []
    for number, sentence in enumerate(sentences, start=1):
        tokens.append(1)
        for word in sentence:
            i = index.get(word)
            if i is None:
                i = index[word] = len(index)
            elif i == 1 or i == 2:
                raise ValueError(f"sentence {number} contains {word}; the model adds <s> and </s> itself")
            tokens.append(i)
        tokens.append(2)
    return list(index), np.array(tokens, dtype=np.int64)


def _count_ngrams(tokens: np.ndarray, order: int, vocab_size: int) -> list[_Level]:
    """Distinct n-grams of orders 1..order that lie inside one sentence, with raw counts.

    An n-gram is identified by the position where it starts. At each order, `ngram_at[i]` is the
    id of the n-gram starting at token i (or -1 if it would cross the sentence end), and the
    next order's key is ngram_at[i] · V + tokens[i + n]; `np.unique` sorts the keys, so the
    n-grams of one history are contiguous and numbered in order.
    """
    length = len(tokens)
    positions = np.arange(length)
    eos_positions = np.flatnonzero(tokens == 2)
    sentence_end = eos_positions[np.searchsorted(eos_positions, positions)]

    raw1 = np.bincount(tokens, minlength=vocab_size)
    words = np.arange(vocab_size)
    levels = [_Level(np.zeros(vocab_size, np.int64), words, np.zeros(vocab_size, np.int64), raw1, words)]
    ngram_at = tokens.copy()  # unigram id = word id
    for n in range(2, order + 1):
        starts = np.flatnonzero(positions + n - 1 <= sentence_end)
        keys = ngram_at[starts] * vocab_size + tokens[starts + n - 1]
        unique, first, inverse, raw = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        # The suffix (words 2..n) of an n-gram starting at i is the (n-1)-gram starting at i+1.
        suffix = ngram_at[starts[first] + 1]
        context = unique // vocab_size
        levels.append(_Level(context, unique % vocab_size, suffix, raw, levels[-1].first[context]))
        ngram_at = np.full(length, -1, dtype=np.int64)
        ngram_at[starts] = inverse
    return levels


def _adjusted_counts(levels: list[_Level], bos: int) -> list[np.ndarray]:
    """Kneser–Ney adjusted counts a(·) per order (see `build_kneser_ney`)."""
    adjusted = []
    for n, level in enumerate(levels, start=1):
        if n == len(levels):
            a = level.raw.copy()
        else:
            # Continuation count: the number of distinct (n+1)-grams x·g whose suffix is g.
            a = np.bincount(levels[n].suffix, minlength=len(level.raw))
            starts_with_bos = level.first == bos
            a[starts_with_bos] = level.raw[starts_with_bos]
        if n == 1:
            a[bos] = 0
        adjusted.append(a)
    return adjusted


def _discounts(a: np.ndarray) -> tuple[float, float, float]:
    """(D_1, D_2, D_3+) from count-of-counts (Chen & Goodman 1998, eq. 26), with a fallback for tiny data."""
    n1, n2, n3, n4 = (int(np.count_nonzero(a == k)) for k in (1, 2, 3, 4))
    if n1 and n2 and n3 and n4:
        y = n1 / (n1 + 2 * n2)
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < dk <= k for k, dk in enumerate(d, start=1)):
            return d
    # Too little data for three discounts: one absolute discount (Ney et al. 1994) for all.
    y = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
    return (y, y, y)


def _interpolate(levels: list[_Level], adjusted: list[np.ndarray], discounts, bos: int) -> list[NGramTable]:
    """Interpolated probabilities and backoff weights (γ) per order, as ARPA tables."""
    uniform = 1.0 / (len(levels[0].raw) - 1)  # |V| counts <unk> and </s>, not <s>
    tables: list[NGramTable] = []
    lower_prob = None
    lower_ids = None
    for n, (level, a) in enumerate(zip(levels, adjusted), start=1):
        d = np.array([0.0, *discounts[n - 1]])
        discount = d[np.minimum(a, 3)]  # D(0) = 0, D(1), D(2), D(3+)
        histories = 1 if n == 1 else len(levels[n - 2].raw)
        total = np.bincount(level.context, weights=a, minlength=histories)  # Σ_v a(h v)
        has_children = total > 0
        gamma = np.zeros(histories)
        discounted = np.bincount(level.context, weights=discount, minlength=histories)  # Σ_v D(a(h v))
        gamma[has_children] = discounted[has_children] / total[has_children]
        prob = (a - discount) / total[level.context]
        if n == 1:
            prob += gamma[0] * uniform
            prob[bos] = 0.0
            ids = level.word[:, None]
        else:
            prob += gamma[level.context] * lower_prob[level.suffix]
            ids = np.hstack([lower_ids[level.context], level.word[:, None]])
            # γ(h) is the backoff weight of history h (an (n-1)-gram).
            tables[-1].backoff10[has_children] = np.log10(gamma[has_children])
        with np.errstate(divide="ignore"):
            logprob10 = np.maximum(np.log10(prob), ARPA_ZERO)
        tables.append(NGramTable(ids.astype(np.int32), logprob10, np.zeros(len(prob))))
        lower_prob, lower_ids = prob, ids
    return tables
