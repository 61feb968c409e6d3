#!/usr/bin/env python3
"""Plot a stream's perplexity across a change of domain: the static model vs the adapting one.

FIRST is streamed, then SECOND, as one stream. Every word is scored twice: by the model as
trained (static) and by a copy that takes one SGD step after each word it has scored, at the
daemon's rate (the dynamic model, exactly what `rnnlm serve` does; tests/test_daemon.py checks the
two agree). The chart shows perplexity over a sliding window of words and the running perplexity
since the start, for both, with the switch marked.

    .venv/bin/python deploy/plot_adaptation.py rnnlm/data/sample.txt /usr/share/common-licenses/GPL-3 \\
        --prose --out docs/adaptation.png

Needs matplotlib (an optional dependency: pip install 'matplotlib==3.11.2').
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, too

from rnnlm.bundled import DEFAULT_MODEL  # noqa: E402
from rnnlm.checkpoint import load_model  # noqa: E402
from rnnlm.corpus import read_lines, tokenize_line  # noqa: E402
from rnnlm.evaluate import evaluate  # noqa: E402
from rnnlm.model import OnlineRule  # noqa: E402



def prose_lines(lines: list[str]) -> list[str]:
    """Ordinary prose as WikiText is tokenised: one paragraph a line, punctuation split off."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    out = []
    for p in paragraphs:
        p = re.sub(r"(\w)-(\w)", r"\1 @-@ \2", p)
        p = re.sub(r"([.,;:!?()\"\[\]])", r" \1 ", p)
        p = re.sub(r"'s\b", " 's", p)
        out.append(" ".join(p.split()))
    return [p for p in out if p]


def windowed(neg_logp: np.ndarray, window: int) -> np.ndarray:
    """Perplexity of the `window` words ending at each word (fewer at the start)."""
    cumulative = np.concatenate([[0.0], np.cumsum(neg_logp)])
    ends = np.arange(1, len(neg_logp) + 1)
    starts = np.maximum(ends - window, 0)
    return np.exp((cumulative[ends] - cumulative[starts]) / (ends - starts))


def running(neg_logp: np.ndarray) -> np.ndarray:
    return np.exp(np.cumsum(neg_logp) / np.arange(1, len(neg_logp) + 1))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("first", type=click.Path(dir_okay=False))
@click.argument("second", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--model", "model_file", default=str(DEFAULT_MODEL), show_default="the bundled default",
              type=click.Path(dir_okay=False), help="Model file.")
@click.option("--prose", is_flag=True, help="SECOND is ordinary wrapped prose: join its paragraphs and split punctuation off as WikiText does.")
@click.option("--lr", default=0.01, show_default=True, type=click.FloatRange(0, min_open=True), help="The adapting model's SGD rate (the daemon's --lr).")
@click.option("--window", default=500, show_default=True, type=click.IntRange(1), help="Words in the sliding window.")
@click.option("--labels", nargs=2, default=None, help="Names of the two texts for the chart (default: file names).")
def main(first, second, out, model_file, prose, lr, window, labels):
    """Plot static vs adapted perplexity of FIRST followed by SECOND to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    model = load_model(model_file)
    second_lines = read_lines(second)
    texts = [read_lines(first), prose_lines(second_lines) if prose else second_lines]
    words = [[w for line in lines for w in tokenize_line(line)] for lines in texts]
    switch = len(words[0])
    stream = words[0] + words[1]

    static, adapted = [], []
    evaluate(model, stream, per_word=static)
    evaluate(model, stream, OnlineRule(lr=lr), weights=model.weights.copy(), per_word=adapted)
    static, adapted = -np.array(static), -np.array(adapted)

    names = labels or [Path(first).name, Path(second).name]
    x = np.arange(1, len(stream) + 1)
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    for nll, name, color in [(static, "static model", "tab:gray"), (adapted, f"adapting (SGD {lr:g} after each word)", "tab:orange")]:
        full = slice(min(window, len(nll)) - 1, None)  # the first few words say nothing yet
        ax.plot(x[full], windowed(nll, window)[full], color=color, lw=1.2, label=f"{name}, last {window} words")
        ax.plot(x[full], running(nll)[full], color=color, lw=1, ls="--", label=f"{name}, running since start")
    ax.axvline(switch, color="black", lw=0.8)
    ax.text(switch, 1.0, f"  {names[1]} →", transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=9)
    ax.text(switch, 1.0, f"← {names[0]}  ", transform=ax.get_xaxis_transform(), va="top", ha="right", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("words streamed")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(model_file).name}: perplexity across a change of domain")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(out)

    for part, span in [(names[0], slice(0, switch)), (names[1], slice(switch, None)),
                       (f"last {window} words", slice(-window, None))]:
        click.echo(f"{part:>30}: static {math.exp(static[span].mean()):9.2f}   adapted {math.exp(adapted[span].mean()):9.2f}")
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
