"""The `rnnlm` command: train, evaluate, serve and stream."""

from __future__ import annotations

import json
import sys
import time

import click

from rnnlm.daemon.config import ServeConfig

from .checkpoint import load_model, save_model
from .cli_errors import BadValue, check_output_file, friendly_errors, option_error, progress_bar, say
from .corpus import read_lines, read_tokens, tokenize_line
from .distributed import SYNC_ALL_WORDS, SYNC_WORDS, default_dense_rate, default_sync_all_words
from .evaluate import Tally, evaluate
from .model import RNNLM, Config, OnlineRule
from .vocab import Vocabulary


class TrainProgress:
    """A progress bar per epoch showing words/s and training entropy."""

    def __init__(self):
        self.bar = None
        self.epoch = 0
        self.shown = 0

    def __call__(self, epoch: int, done: int, total: int, tally: Tally) -> None:
        if epoch != self.epoch:
            self.close()
            self.epoch, self.shown = epoch, 0
            self.bar = progress_bar(total)
            self.bar.__enter__()
        # tally.seconds runs from the start of the epoch, not from this bar's first update.
        self.bar.label = (f"epoch {epoch:2d}  {tally.words_per_sec:8,.0f} words/s  "
                          f"train entropy {tally.entropy_bits:5.2f} bits")
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class BestSoFar:
    """A copy of the weights of the best epoch on validation so far (the ones training keeps), so
    that Ctrl-C in the middle of the next epoch can still save them."""

    def __init__(self, model: RNNLM):
        self.model = model
        self.best = None  # (a copy of the weights, the epoch they finished); one attribute, set at once

    def note(self, epoch) -> None:
        if epoch.kept:
            self.best = (self.model.weights.copy(), epoch)

    def save_on_interrupt(self, out: str):
        """Save them and exit with status 130 (128 + SIGINT), or say nothing was saved.

        The copy is saved as a model of its own rather than copied back into the live arrays: a
        training thread may still be finishing its round when the interrupt arrives."""
        if self.best is None:
            say("interrupted before any epoch finished well: nothing saved")
        else:
            weights, epoch = self.best
            save_model(RNNLM(self.model.config, self.model.vocab, weights), out)
            say(f"interrupted: saved the best model so far (epoch {epoch.epoch}, valid perplexity "
                f"{epoch.valid.perplexity:.2f}) to {out}")
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rnnlm")
def main():
    """Recurrent neural network language models (Mikolov et al., 2010) that keep learning.

    Train a model, measure its perplexity (static or dynamic), and serve it as a daemon that scores
    text streamed over ZeroMQ while adapting to it.
    """


@main.command()
@click.option("--train", "train_file", required=True, type=click.Path(dir_okay=False), help="Training text, one sentence per line.")
@click.option("--valid", "valid_file", required=True, type=click.Path(dir_okay=False), help="Validation text for the learning-rate schedule.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write.")
@click.option("--hidden", default=200, show_default=True, type=click.IntRange(1, 4096), help="Hidden layer size.")
@click.option("--classes", default=100, show_default=True, type=click.IntRange(1), help="Output frequency classes (1 = full softmax).")
@click.option("--class-rule", default="frequency", show_default=True, type=click.Choice(["frequency", "sqrt"]), help="Classes share the unigram mass by count, or by sqrt(count): faster, a little worse.")
@click.option("--bptt", default=4, show_default=True, type=click.IntRange(0, 64), help="Extra steps of back-propagation through time (0 = plain backprop).")
@click.option("--bptt-block", default=10, show_default=True, type=click.IntRange(1, 64), help="Back-propagate through time every this many words.")
@click.option("--min-count", default=1, show_default=True, type=click.IntRange(1), help="Words seen fewer times merge into the rare token (eq. 7).")
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True), help="Initial learning rate α.")
@click.option("--l2", default=1e-7, show_default=True, type=click.FloatRange(0), help="L2 regularisation β.")
@click.option("--min-improvement", default=1.003, show_default=True, type=click.FloatRange(1), help="Start halving α when validation log-likelihood improves by less than this factor.")
@click.option("--max-epochs", default=20, show_default=True, type=click.IntRange(1), help="Upper bound on epochs.")
@click.option("--seed", default=1, show_default=True, type=int, help="Random seed for the initial weights.")
@click.option("--direct", default=0.0, show_default=True, type=click.FloatRange(0), help="Direct connections (RNNME): millions of hashed n-gram weights on the outputs; 0 = off.")
@click.option("--direct-order", default=3, show_default=True, type=click.IntRange(1, 16), help="The direct features see the last 0..N-1 words.")
@click.option("--direct-l2", default=0.0, show_default=True, type=click.FloatRange(0), help="L2 of the direct weights (their own; on small data it matters).")
@click.option("--direct-rate", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True), help="The direct weights learn at this multiple of α (in training and dynamically).")
@click.option("--dense-rate", default=None, type=click.FloatRange(0, min_open=True), help="W and X learn at this multiple of α in training.  [default: 1; under torchrun, ranks/8 up to 1]")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="Hogwild training threads.")
@click.option("--sync-words", default=SYNC_WORDS, show_default=True, type=click.IntRange(1), help="Under torchrun: words per rank between merges of W, X and the frequent words' rows.")
@click.option("--sync-all-words", default=None, type=click.IntRange(1), help=f"Under torchrun: words per rank between merges of all the weights, at least --sync-words.  [default: {SYNC_ALL_WORDS:,} / ranks]")
@click.option("--merge", "merge_rule", default="sparse-sum", show_default=True, type=click.Choice(["sparse-sum", "mean"]), help="Under torchrun: average W and X and keep every rank's U and V updates, or average all four.")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help="Training checkpoint file, written after every epoch (and every --checkpoint-words).")
@click.option("--checkpoint-words", default=None, type=click.IntRange(1), help="Also checkpoint inside an epoch, every this many words per process.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint if it exists (under torchrun --max-restarts, a restarted group goes on from there).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@friendly_errors
def train(train_file, valid_file, out, hidden, classes, class_rule, bptt, bptt_block, min_count, lr, l2, min_improvement,
          max_epochs, seed, direct, direct_order, direct_l2, direct_rate, dense_rate, threads, sync_words, sync_all_words, merge_rule, checkpoint, checkpoint_words, resume, as_json):
    """Train a model with SGD, truncated BPTT and the halving learning-rate schedule.

    Under torchrun (`torchrun --nproc-per-node N -m rnnlm train ...`) each process learns from its
    part of the text and the processes merge their weights as they go (--sync-words,
    --sync-all-words); rank 0 writes --out.
    """
    from .distributed import Launch

    launch = Launch.from_environment()
    if dense_rate is None:
        dense_rate = default_dense_rate(launch.world_size)
    if sync_all_words is None:
        sync_all_words = default_sync_all_words(launch.world_size, sync_words)
    if sync_all_words < sync_words:
        raise click.BadParameter(f"{sync_all_words} is less than --sync-words {sync_words}", param_hint="--sync-all-words")
    check_output_file("--out", out)
    train_words, valid_words = read_tokens(train_file), read_tokens(valid_file)
    config = Config(hidden=hidden, classes=classes, bptt=bptt, bptt_block=bptt_block, min_count=min_count,
                    lr=lr, l2=l2, min_improvement=min_improvement, max_epochs=max_epochs, seed=seed,
                    direct=direct, direct_order=direct_order, direct_l2=direct_l2, direct_rate=direct_rate,
                    dense_rate=dense_rate)
    vocab = Vocabulary.build(train_words, min_count, classes, class_rule)
    try:
        model = RNNLM.create(config, vocab)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--direct") from None
    direct_note = f", direct {config.direct_size:,} weights order {direct_order}" if config.direct_size else ""
    say(f"vocabulary {len(vocab):,} words ({len(vocab.rare_words):,} rare merged), {vocab.num_classes} classes, "
        f"hidden {hidden}{direct_note}; {len(train_words):,} training words, {threads} thread(s)")
    bar = TrainProgress()
    best = BestSoFar(model)

    def on_epoch(e):
        bar.close()
        best.note(e)
        say(f"epoch {e.epoch:2d}  α {e.lr:.5f}  train {e.train.words_per_sec:7,.0f} words/s  "
            f"valid perplexity {e.valid.perplexity:8.2f}" + ("" if e.kept else "  (worse: weights restored)"))

    try:
        report = launch.train(model, train_words, valid_words, threads, bar, on_epoch, sync_words=sync_words,
                              sync_all_words=sync_all_words, merge_rule=merge_rule, checkpoint=checkpoint, checkpoint_words=checkpoint_words,
                              resume=resume)
    except KeyboardInterrupt:
        bar.close()
        if not launch.writes_files:
            sys.exit(130)
        best.save_on_interrupt(out)
    bar.close()
    if not launch.writes_files:
        return
    save_model(model, out)
    best = report.best_valid
    say(f"done in {report.seconds:.1f} s ({report.words_per_sec:,.0f} words/s), "
        f"valid perplexity {best.perplexity:.2f}; wrote {out}")
    if as_json:
        click.echo(json.dumps({
            "seconds": report.seconds,
            "epochs": len(report.epochs),
            "words_per_sec": report.words_per_sec,
            "valid_perplexity": best.perplexity,
            "history": [{"epoch": e.epoch, "lr": e.lr, "valid_perplexity": e.valid.perplexity,
                         "train_words_per_sec": e.train.words_per_sec, "kept": e.kept} for e in report.epochs],
        }))


@main.command("eval")
@click.option("--model", "model_files", multiple=True, type=click.Path(dir_okay=False), help="Model file from `rnnlm train`; repeat to mix several.")
@click.option("--test", "test_file", required=True, type=click.Path(dir_okay=False), help="Text to score, one sentence per line.")
@click.option("--ngram", "ngram_file", default=None, type=click.Path(dir_okay=False), help="ARPA backoff model (e.g. from `rnnlm ngram build`) to interpolate with, or to score alone.")
@click.option("--ngram-weight", type=click.FloatRange(0, 1), default=None, help="Weight of the --ngram model (default 0.25 with RNN models); the RNNs share the rest equally.")
@click.option("--weights", "weights_text", default=None, metavar="W1,W2,...", help="Mixture weights, one per --model in order, then the n-gram's; they sum to 1.")
@click.option("--tune-on", "tune_file", default=None, type=click.Path(dir_okay=False), help="Tune the mixture weights by EM on this validation text first.")
@click.option("--dynamic", type=click.FloatRange(0, min_open=True), default=None, help="Dynamic model: learn from each word after scoring it, at this rate (the paper: 0.01); applies to every RNN model.")
@click.option("--dynamic-bptt", default=OnlineRule.bptt, show_default=True, type=click.IntRange(0, 64), help="Extra steps back in time in each dynamic update (0 = plain backprop).")
@click.option("--dynamic-direct-rate", type=click.FloatRange(0, min_open=True), default=None, help="Direct weights (RNNME models) learn at this multiple of --dynamic (default: the rate multiple they were trained with).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 64), help="Static scoring of one model: split the text at sentence ends across threads, each part starting fresh.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@friendly_errors
def eval_command(model_files, test_file, ngram_file, ngram_weight, weights_text, tune_file, dynamic, dynamic_bptt,
                 dynamic_direct_rate, threads, as_json):
    """Measure perplexity on a text, static or with the dynamic model, of one model or a mixture.

    Several --model files and an --ngram ARPA model are interpolated word by word,
    P(w) = Σ λ_c P_c(w), over one event space (see rnnlm.mixture for how their vocabularies are
    reconciled). Weights: --weights, or --ngram-weight (RNNs share the rest), or tuned by EM
    with --tune-on; by default 0.25 for the n-gram and equal shares otherwise.
    """
    if not model_files and not ngram_file:
        raise click.UsageError("give at least one --model or an --ngram model")
    rule = OnlineRule(lr=dynamic, bptt=dynamic_bptt, direct_rate=dynamic_direct_rate) if dynamic is not None else None
    _need_files(ngram_file, tune_file)
    mixing = len(model_files) > 1 or ngram_file or weights_text or tune_file or ngram_weight is not None
    if not mixing:
        result = _eval_single(model_files[0], test_file, rule, threads)
    else:
        result = _eval_mixture(model_files, ngram_file, ngram_weight, weights_text, tune_file, test_file, rule)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['mode']} perplexity {result['perplexity']:.2f}  entropy {result['entropy_bits']:.4f} bits  "
               f"words {result['words']:,} (OOV {result['oov']:,}, rare {result['rare']:,})  "
               f"{result['words_per_sec']:,.0f} words/s")
    if mixing:
        known = result["excluding_unk"]
        click.echo(f"  excluding <unk> and OOV tokens (as KenLM's 'perplexity excluding OOVs'): perplexity "
                   f"{known['perplexity']:.2f}  words {known['words']:,} ({known['excluded']:,} left out)")
        for part in result["components"]:
            ppl = "inf" if part["perplexity"] is None else f"{part['perplexity']:.2f}"
            mode = "dynamic" if part["dynamic"] else "static"
            click.echo(f"  weight {part['weight']:.4f}  {part['kind']:5s} {mode:7s}  perplexity {ppl:>8s}  "
                       f"OOV {part['oov']:,}  {part['name']}")


def _eval_single(model_file: str, test_file: str, rule: OnlineRule | None, threads: int) -> dict:
    """One RNN model: the original `rnnlm eval` (the static case may use several threads)."""
    model = load_model(model_file)
    lines = read_lines(test_file)
    if rule is not None:
        tally = evaluate(model, [t for line in lines for t in tokenize_line(line)], rule, weights=model.weights.copy())
    else:
        tally = evaluate_static_parallel(model, lines, threads)
    mode = "dynamic" if rule is not None else "static"
    return {"model": model_file, "models": [model_file], "ngram": None, "test": test_file, "mode": mode,
            "dynamic_lr": rule.lr if rule else None, **tally.as_dict(), "weights": [1.0],
            "components": [{"name": model_file, "kind": "rnn", "dynamic": rule is not None, "weight": 1.0,
                            "perplexity": tally.perplexity, "oov": tally.oov, "rare": tally.rare}]}


def _eval_mixture(model_files, ngram_file, ngram_weight, weights_text, tune_file, test_file, rule) -> dict:
    """Several models interpolated per word, weights given or tuned by EM on a validation text."""
    if tune_file and (weights_text or ngram_weight is not None):
        raise click.UsageError("--tune-on finds the weights itself; leave out --weights and --ngram-weight")
    mixture = _build_mixture(model_files, ngram_file, weights_text, ngram_weight, rule)
    tuning = None
    if tune_file:
        em = mixture.tune(read_tokens(tune_file))
        say(f"tuned on {tune_file}: weights {', '.join(f'{w:.4f}' for w in mixture.weights)} "
            f"({em.iterations} EM iterations, perplexity there {em.perplexity:.2f})")
        tuning = {"file": tune_file, "iterations": em.iterations, "perplexity": em.perplexity}
    tokens = read_tokens(test_file)
    score = mixture.score(tokens)
    mode = "dynamic" if rule is not None else "static"
    result = {"models": list(model_files), "ngram": ngram_file, "test": test_file, "mode": mode,
              "dynamic_lr": rule.lr if rule else None, **score.tally.as_dict(), "skipped": score.skipped,
              "weights": score.weights.tolist(), "tuning": tuning,
              "excluding_unk": {"perplexity": score.known.perplexity, "words": score.known.words,
                                "excluded": score.tally.words - score.known.words},
              "components": [{k: _finite(v) for k, v in part.items()} for part in score.components]}
    if len(model_files) == 1:
        result["model"] = model_files[0]
    return result


def _need_files(*paths) -> None:
    """A missing input file as one clear line (the way read_lines and load_model say it)."""
    from pathlib import Path

    for path in paths:
        if path is not None and not Path(path).is_file():
            raise click.ClickException(f"{path}: no such file")


def _finite(value):
    """JSON has no infinity: a non-finite number becomes null."""
    import math

    return None if isinstance(value, float) and not math.isfinite(value) else value


def _build_mixture(model_files, ngram_file, weights_text, ngram_weight, rule):
    """Load the components (RNNs first, in order, then the n-gram) and set the weights."""
    from .mixture import Mixture, NGramComponent, RNNComponent
    from .ngram import read_arpa

    components = [RNNComponent(load_model(path), path, rule) for path in model_files]
    if ngram_file:
        start = time.perf_counter()
        lm = read_arpa(ngram_file)
        say(f"loaded {ngram_file}: order {lm.order}, {sum(lm.counts):,} n-grams ({time.perf_counter() - start:.1f} s)")
        components.append(NGramComponent(lm, ngram_file))
    weights = _mixture_weights(weights_text, ngram_weight, len(model_files), bool(ngram_file))
    return Mixture(components, weights)


def _mixture_weights(weights_text, ngram_weight, rnn_count: int, has_ngram: bool) -> list[float]:
    """--weights as given; else the n-gram gets --ngram-weight (default 0.25) and the RNNs share the rest."""
    count = rnn_count + has_ngram
    if weights_text is not None:
        if ngram_weight is not None:
            raise click.UsageError("give --weights or --ngram-weight, not both")
        try:
            weights = [float(w) for w in weights_text.split(",")]
        except ValueError:
            raise click.UsageError(f"--weights {weights_text!r}: expected numbers separated by commas") from None
        if len(weights) != count:
            raise click.UsageError(f"--weights has {len(weights)} numbers for {count} models "
                                   "(one per --model, then one for --ngram)")
        return weights
    if ngram_weight is not None and not has_ngram:
        raise click.UsageError("--ngram-weight needs an --ngram model")
    if has_ngram and rnn_count == 0 and ngram_weight not in (None, 1.0):
        raise click.UsageError("--ngram-weight needs a --model to mix the n-gram with")
    from .mixture import DEFAULT_NGRAM_WEIGHT, default_weights

    return default_weights(rnn_count, has_ngram, DEFAULT_NGRAM_WEIGHT if ngram_weight is None else ngram_weight)


def evaluate_static_parallel(model: RNNLM, lines: list[str], threads: int) -> Tally:
    """Static scoring, optionally in `threads` parts; the compiled loop releases the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    if threads == 1:
        return evaluate(model, [t for line in lines for t in tokenize_line(line)])
    parts = [lines[len(lines) * i // threads: len(lines) * (i + 1) // threads] for i in range(threads)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        tallies = list(pool.map(lambda part: evaluate(model, [t for line in part for t in tokenize_line(line)]),
                                [p for p in parts if p]))
    total = Tally()
    for t in tallies:
        total.add_counts(t.words, t.oov, t.rare, t.loss_nats)
    total.seconds = time.perf_counter() - start
    return total


@main.command()
@click.option("--model", "model_file", default=None, type=click.Path(dir_okay=False), help="Model file (default: the bundled default model).")
@click.option("--bind", default=ServeConfig.bind, show_default=True, help="Request/reply endpoint (ROUTER); ipc:// works, port 0 picks a free one.")
@click.option("--pull-bind", default=None, help="Optional fire-and-forget ingestion endpoint (PULL): score ops, no replies.")
@click.option("--metrics-addr", default=ServeConfig.metrics_addr, show_default=True, help="HOST:PORT of the Prometheus /metrics endpoint (port 0 picks one).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False), help="Where checkpoints of the adapted state go; a restart resumes from the newest.")
@click.option("--port-file", default=None, type=click.Path(dir_okay=False), help="Write the bound endpoints as JSON here once ready (for tests and supervisors).")
@click.option("--lr", default=ServeConfig.lr, show_default=True, type=click.FloatRange(0, min_open=True), help="Fixed SGD rate of the online update (the dynamic model).")
@click.option("--no-learn", is_flag=True, help="Score only; never update the weights.")
@click.option("--checkpoint-tokens", default=ServeConfig.checkpoint_tokens, show_default=True, type=click.IntRange(1), help="Checkpoint after this many scored tokens.")
@click.option("--checkpoint-seconds", default=ServeConfig.checkpoint_seconds, show_default=True, type=click.FloatRange(0.1), help="...or after this many seconds with new tokens.")
@click.option("--keep-checkpoints", default=ServeConfig.keep_checkpoints, show_default=True, type=click.IntRange(1), help="Checkpoint files to keep.")
@click.option("--max-streams", default=ServeConfig.max_streams, show_default=True, type=click.IntRange(1), help="Streams with hidden state; the least recently used is dropped beyond this.")
@click.option("--stream-idle-seconds", default=ServeConfig.stream_idle_seconds, show_default=True, type=click.FloatRange(1), help="Drop a stream's state after this long without traffic.")
@click.option("--max-domains", default=ServeConfig.max_domains, show_default=True, type=click.IntRange(1), help="Domains (sets of adapted weights).")
@click.option("--max-tokens", default=ServeConfig.max_tokens, show_default=True, type=click.IntRange(1), help="Tokens in one message.")
@click.option("--max-message-bytes", default=ServeConfig.max_message_bytes, show_default=True, type=click.IntRange(64), help="Largest request; up to twice this gets a message_too_large error, more makes ZeroMQ disconnect the peer.")
@click.option("--max-pending", default=ServeConfig.max_in_hand, show_default=True, type=click.IntRange(1), help="Messages taken from the sockets before they are handled; the rest wait in ZeroMQ's queues.")
@click.option("--curve-secret-key", default=None, type=click.Path(dir_okay=False), help="The daemon's key pair (NAME.key_secret from `rnnlm keygen`): CURVE encryption on the request and ingest sockets.")
@click.option("--curve-authorized-dir", default=None, type=click.Path(file_okay=False), help="Directory of the public keys (*.key) of the clients let in; every other client is refused.")
@click.option("--curve-admin-dir", default=None, type=click.Path(file_okay=False), help="With CURVE: only the clients whose public keys (*.key) are here may send save, reset and drop_domain (they must be authorised too). SIGHUP rereads it.")
@click.option("--max-domains-per-key", default=None, type=click.IntRange(1), help="With CURVE: domains one client key may create.")
@click.option("--max-memory-mb", default=None, type=click.FloatRange(1), help="Refuse new domains (error memory_budget), and drop the least recently used streams, rather than grow past this; see the memory budget in the docs.")
@click.option("--domain-idle-seconds", default=ServeConfig.domain_idle_seconds, show_default=True, type=click.FloatRange(0), help="Drop a domain after this long without a message, after a checkpoint that holds it; 0 = never.")
@click.option("--decay-to-base", default=ServeConfig.decay_to_base, show_default=True, type=click.FloatRange(0, 1), help="After each message learned from, w += λ(w_base - w) (Krause et al. 2018); 0 = off.")
@click.option("--shadow-sample", default=ServeConfig.shadow_sample, show_default=True, type=click.FloatRange(0, 1), help="Fraction of score messages also scored by the base model, for the adapted-vs-base metrics; 0 = off.")
@click.option("--guard-margin", default=None, type=click.FloatRange(0), help="Roll a domain back when its adapted perplexity on the sample exceeds the base model's by this fraction (0.1 = 10 %); needs --shadow-sample.")
@click.option("--guard-window", default=ServeConfig.guard_window, show_default=True, type=click.IntRange(1), help="Sampled tokens per guard comparison.")
@click.option("--extra-model", "extra_models", multiple=True, type=click.Path(dir_okay=False), help="Another RNN model in every score, adapting per domain like --model; repeat for more.")
@click.option("--ngram", "ngram_file", default=None, type=click.Path(dir_okay=False), help="ARPA backoff model (e.g. from `rnnlm ngram build`) in every score.")
@click.option("--ngram-weight", type=click.FloatRange(0, 1), default=None, help="Weight of the --ngram model (default 0.25); the RNNs share the rest equally.")
@click.option("--weights", "weights_text", default=None, metavar="W1,W2,...", help="Mixture weights: --model, each --extra-model in order, then the n-gram's; they sum to 1.")
@click.option("--tune-on", "tune_file", default=None, type=click.Path(dir_okay=False), help="Before serving, tune the mixture weights by EM on this validation text, every RNN learning at --lr as it will in service (as `rnnlm eval --dynamic LR --tune-on`).")
@click.option("--workers", default=None, type=click.IntRange(1), help="Learner threads; domains are spread over them and learn in parallel, each in its own arrival order (default: the number of cores).")
@click.option("--fleet", default=None, type=click.Path(dir_okay=False), help="A fleet file (lines of NAME ENDPOINT): this daemon serves the domains it owns by rendezvous hashing and answers `moved` with the owner for the others. SIGHUP rereads it.")
@click.option("--fleet-name", default=None, help="This daemon's name in the --fleet file (default: the host name, which is the pod's name in a StatefulSet).")
@click.option("--fleet-store", default=None, type=click.Path(file_okay=False), help="A directory every member of the --fleet mounts (on Kubernetes a ReadWriteMany volume): each member keeps its checkpoints in FLEET_STORE/NAME, and a domain whose owner changes is handed over through it with nothing lost (docs/daemon.md, Fleets). Replaces --state-dir.")
@click.option("--handoff-wait", "handoff_wait_seconds", default=ServeConfig.handoff_wait_seconds, show_default=True, type=click.FloatRange(0), help="Seconds to wait for a member that left the fleet to hand its domains over before taking them from its last checkpoint (it was killed).")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]))
@friendly_errors
def serve(model_file, bind, pull_bind, metrics_addr, state_dir, port_file, lr, no_learn, checkpoint_tokens,
          checkpoint_seconds, keep_checkpoints, max_streams, stream_idle_seconds, max_domains, max_tokens,
          max_message_bytes, max_pending, curve_secret_key, curve_authorized_dir, curve_admin_dir, max_domains_per_key,
          max_memory_mb, domain_idle_seconds, decay_to_base, shadow_sample,
          guard_margin, guard_window, extra_models, ngram_file, ngram_weight, weights_text, tune_file, workers, fleet,
          fleet_name, fleet_store, handoff_wait_seconds, log_level):
    """Run the daemon: score text streamed over ZeroMQ and keep learning from it.

    Every word is scored with the current weights, then the network takes one SGD step on it at
    --lr (0.01, the dynamic model). Runs in the foreground; SIGTERM answers what is in hand,
    writes a checkpoint and exits 0. The wire protocol is in docs/protocol.md.

    With --extra-model and/or --ngram, every score interpolates the models word by word as
    `rnnlm eval` does (every RNN adapting per domain); replies and metrics also give the --model
    RNN's own loss, so the gain of the mixture shows.
    """
    import logging

    from rnnlm.daemon.server import Server

    config = ServeConfig(model=model_file, bind=bind, pull_bind=pull_bind, metrics_addr=metrics_addr,
                         state_dir=state_dir, port_file=port_file, lr=lr, learn=not no_learn,
                         checkpoint_tokens=checkpoint_tokens, checkpoint_seconds=checkpoint_seconds,
                         keep_checkpoints=keep_checkpoints, max_streams=max_streams,
                         stream_idle_seconds=stream_idle_seconds, max_domains=max_domains, max_tokens=max_tokens,
                         max_message_bytes=max_message_bytes, max_in_hand=max_pending,
                         curve_secret_key=curve_secret_key, curve_authorized_dir=curve_authorized_dir,
                         curve_admin_dir=curve_admin_dir, max_domains_per_key=max_domains_per_key,
                         domain_idle_seconds=domain_idle_seconds, max_memory_mb=max_memory_mb,
                         decay_to_base=decay_to_base, shadow_sample=shadow_sample, guard_margin=guard_margin,
                         guard_window=guard_window, extra_models=tuple(extra_models), ngram=ngram_file,
                         tune_on=tune_file, fleet=fleet, fleet_store=fleet_store,
                         handoff_wait_seconds=handoff_wait_seconds, **({"workers": workers} if workers is not None else {}),
                         **({"fleet_name": fleet_name} if fleet_name is not None else {}))
    try:
        config.check()
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    # Addresses first: a typo should be the one thing said, before any warning or model loading.
    _check_bindable("--bind", bind)
    if pull_bind:
        _check_bindable("--pull-bind", pull_bind)
    _check_listenable("--metrics-addr", metrics_addr)
    weights = None
    if extra_models or ngram_file:
        _need_files(*extra_models, ngram_file, tune_file)
        if tune_file and (weights_text or ngram_weight is not None):
            raise click.UsageError("--tune-on finds the weights itself; leave out --weights and --ngram-weight")
        weights = tuple(_mixture_weights(weights_text, ngram_weight, 1 + len(extra_models), bool(ngram_file)))
    elif weights_text is not None or ngram_weight is not None or tune_file:
        raise click.UsageError("--weights, --ngram-weight and --tune-on need --extra-model or --ngram")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if curve_secret_key is None and not all(_is_loopback(e) for e in (bind, pull_bind) if e):
        logging.getLogger("rnnlm.daemon").warning(
            "serving without CURVE on a non-loopback endpoint: anyone who can reach it can make the model learn")
    config.weights = weights
    sys.exit(Server(config).run())


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--connect", default="tcp://127.0.0.1:5555", show_default=True, help="The daemon's request endpoint.")
@click.option("--stream", "stream_id", default="cli", show_default=True, help="Stream id (its own hidden state).")
@click.option("--domain", default=None, help="Domain whose adapted weights are read and updated (default: the daemon's default).")
@click.option("--no-learn", is_flag=True, help="Score only; ask the daemon not to learn from this text.")
@click.option("--window", default=64, show_default=True, type=click.IntRange(1, 10_000), help="Requests kept in flight.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(0.1), help="Seconds to wait for a reply.")
@click.option("--every", default=0, type=click.IntRange(0), help="Also print the perplexity of each span of this many lines.")
@click.option("--json", "as_json", is_flag=True, help="End by printing one JSON object on stdout.")
@click.option("--curve-secret-key", default=None, type=click.Path(dir_okay=False), help="This client's key pair (NAME.key_secret from `rnnlm keygen`), for a daemon running CURVE.")
@click.option("--curve-server-key", default=None, type=click.Path(dir_okay=False), help="The daemon's public key (its NAME.key).")
@friendly_errors
def stream(file, connect, stream_id, domain, no_learn, window, timeout, every, as_json, curve_secret_key,
           curve_server_key):
    """Stream FILE line by line through a running daemon and show its running perplexity."""
    from rnnlm.clients.client import Client, DaemonError, EndpointError, ReplyTimeout, score_fields

    if (curve_secret_key is None) != (curve_server_key is None):
        raise click.UsageError("--curve-secret-key and --curve-server-key go together")
    curve = (curve_secret_key, curve_server_key) if curve_secret_key else None
    lines = read_lines(file)
    tally, span = Tally(), Tally()
    done, span_start = 0, 1
    start = time.perf_counter()
    requests = ({"op": "score", **score_fields(line, None, stream_id, domain, not no_learn)} for line in lines)
    # With --every, one line per span replaces the progress bar; on a pipe there is no bar.
    bar = progress_bar(len(lines), "streaming", hidden=bool(every))
    try:
        with Client(connect, timeout=timeout, curve=curve) as client, bar:
            for reply in client.pipeline(requests, window):
                done += 1
                for t in (tally, span):
                    t.add_counts(reply["tokens"], len(reply["oov"]), len(reply["rare"]), reply["loss"])
                bar.label = f"perplexity {tally.perplexity:8.2f}  {tally.words / (time.perf_counter() - start):8,.0f} words/s"
                bar.update(1)
                if every and (done % every == 0 or done == len(lines)):
                    say(f"lines {span_start:>6,}-{done:<6,}  perplexity {span.perplexity:8.2f}   running {tally.perplexity:8.2f}")
                    span, span_start = Tally(), done + 1
    except EndpointError as err:
        raise BadValue("--connect", connect, err.reason) from None
    except ReplyTimeout as err:
        raise click.ClickException(f"{err} (is the daemon running?); {done:,} lines scored") from None
    except DaemonError as err:
        # The pipeline stops at the first refusal: the lines after it were not all scored.
        raise click.ClickException(f"the daemon refused line {done + 1} of {file}: {err}; "
                                   f"{done:,} lines scored before it") from None
    tally.seconds = time.perf_counter() - start
    result = {"endpoint": connect, "stream": stream_id, "domain": domain, "learn": not no_learn, **tally.as_dict()}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {tally.perplexity:.2f}  words {tally.words:,} (OOV {tally.oov:,})  "
                   f"{tally.words_per_sec:,.0f} words/s")


@main.command()
@click.option("--nbest", "nbest_file", required=True, type=click.Path(dir_okay=False), help="N-best lists: 'utt_id acoustic_score lm_score words...' per line (see rnnlm.nbest).")
@click.option("--refs", "refs_file", required=True, type=click.Path(dir_okay=False), help="Reference transcripts: 'utt_id words...' per line.")
@click.option("--model", "model_files", multiple=True, type=click.Path(dir_okay=False), help="RNN model to score the hypotheses with; repeat to mix several.")
@click.option("--ngram", "ngram_file", default=None, type=click.Path(dir_okay=False), help="ARPA backoff model to score with (alone or mixed with the RNNs).")
@click.option("--ngram-weight", type=click.FloatRange(0, 1), default=None, help="Weight of the --ngram model (default 0.25 with RNN models).")
@click.option("--weights", "weights_text", default=None, metavar="W1,W2,...", help="Mixture weights, one per --model in order, then the n-gram's.")
@click.option("--lm-weight", default=1.0, show_default=True, type=float, help="λ in acoustic + λ·ln P_LM + penalty·words.")
@click.option("--word-penalty", default=0.0, show_default=True, type=float, help="Added per hypothesis word (positive favours longer hypotheses).")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False), help="Write the chosen 1-best hypotheses here ('utt_id words...').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@friendly_errors
def rescore(nbest_file, refs_file, model_files, ngram_file, ngram_weight, weights_text, lm_weight, word_penalty,
            out_file, as_json):
    """Rescore n-best lists with new LM scores and report the word error rate of the 1-best.

    Each hypothesis scores acoustic + λ·ln P_LM(words </s>) + penalty·len(words); the best one
    per utterance is aligned to the reference (Levenshtein) for substitutions, deletions and
    insertions. With no --model or --ngram, the file's own lm_score column is used. Models score
    each hypothesis as a sentence on its own, statically.
    """
    from .nbest import Hypothesis, one_best, read_nbest, read_texts, rescore as pick_best, wer, write_texts

    _need_files(nbest_file, refs_file, ngram_file)
    nbest, refs = read_nbest(nbest_file), read_texts(refs_file)
    scored = model_files or ngram_file
    if scored:
        mixture = _build_mixture(model_files, ngram_file, weights_text, ngram_weight, None)
        with click.progressbar(nbest.items(), length=len(nbest), file=sys.stderr, width=30,
                               label="scoring hypotheses") as items:
            nbest = {utt: [Hypothesis(h.words, h.acoustic, mixture.sentence_logprob(h.words)) for h in hyps]
                     for utt, hyps in items}
    elif weights_text or ngram_weight is not None:
        raise click.UsageError("--weights and --ngram-weight need --model or --ngram")
    best = one_best(pick_best(nbest, None, lm_weight, word_penalty))
    if out_file:
        write_texts(best, out_file)
    result = wer(refs, best)
    report = {"wer": result.wer, "errors": result.errors, "substitutions": result.substitutions,
              "deletions": result.deletions, "insertions": result.insertions, "ref_words": result.ref_words,
              "sentences": result.sentences, "sentence_errors": result.sentence_errors,
              "hypotheses": sum(len(h) for h in nbest.values()), "lm_weight": lm_weight,
              "word_penalty": word_penalty, "models": list(model_files), "ngram": ngram_file,
              "weights": mixture.weights.tolist() if scored else None}
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(result.summary())


from .ngram_cli import ngram_group  # noqa: E402  (a command group of its own module)

main.add_command(ngram_group)


def _check_bindable(option: str, endpoint: str) -> None:
    """Bind a throwaway ZeroMQ socket to `endpoint` and close it: the daemon's own bind, tried early."""
    import errno

    import zmq

    ctx = zmq.Context()
    socket = ctx.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as err:
        if err.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise option_error(option, endpoint, f"cannot bind: {zmq.strerror(err.errno)}") from None
        why = {errno.ENODEV: "no local address or interface of that name",
               errno.EPROTONOSUPPORT: "unknown transport (use tcp://, ipc:// or inproc://)"}.get(err.errno, zmq.strerror(err.errno))
        raise BadValue(option, endpoint, f"{why}; expected e.g. tcp://127.0.0.1:5555") from None
    finally:
        socket.close(0)
        ctx.term()


def _check_listenable(option: str, addr: str) -> None:
    """HOST:PORT that an HTTP server can listen on (tried, then closed), said before anything starts."""
    import socket

    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise BadValue(option, addr, "expected HOST:PORT, e.g. 127.0.0.1:9109 (port 0 picks one)")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise BadValue(option, addr, f"unknown host {host!r} ({err.strerror})") from None
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server will
        probe.bind(where)
        probe.listen()
    except OSError as err:
        raise option_error(option, addr, f"cannot listen there: {err.strerror}") from None
    finally:
        probe.close()


def _is_loopback(endpoint: str) -> bool:
    """tcp://127.x / [::1] / localhost, or a local transport (ipc://, inproc://)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write the key pair into.")
@click.option("--name", default="server", show_default=True, help="Base name of the files: NAME.key (public) and NAME.key_secret.")
@friendly_errors
def keygen(out_dir, name):
    """Write a CURVE key pair for the daemon or a client.

    NAME.key is the public key: give the daemon's to its clients (--curve-server-key), and put each
    client's into the daemon's --curve-authorized-dir. NAME.key_secret stays with its owner (mode 600).
    """
    from rnnlm.daemon.auth import keygen as write_keys

    public, secret = write_keys(out_dir, name)
    click.echo(f"public key {public}\nsecret key {secret}")

if __name__ == "__main__":
    main()
