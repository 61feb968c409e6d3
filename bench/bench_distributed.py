"""`rnnlm train` on torch.distributed, measured on shared/data (see docs/distributed-training.md).

    python bench/bench_distributed.py speed                 # 2 ranks × 1 thread vs 1 process × 1 thread, one epoch
    python bench/bench_distributed.py quality --ranks 2     # a whole run, then test perplexity static and dynamic
    python bench/bench_distributed.py allreduce             # all_reduce of the model's size: loopback and a veth pair
    python bench/bench_distributed.py project               # One Billion Word epoch time, projected from the above

Every measurement prints the machine's load (`uptime`) beside it: the machine is shared.
Ranks run under `torchrun --standalone`; one rank is `rnnlm train` without torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")
BIN = Path(sys.executable).parent


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float, int]:
    """stdout, wall seconds, and the peak RSS (kB) of the largest process of the command's tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return out, seconds, peak_rss_kb()


def peak_rss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def train_command(ranks: int, corpus: str, out: Path, threads: int, extra: list[str]) -> list[str]:
    data = DATA / corpus
    prefix = "ptb." if corpus == "ptb" else "wiki."
    args = ["train", "--train", str(data / f"{prefix}train.txt"), "--valid", str(data / f"{prefix}valid.txt"),
            "--out", str(out), "--threads", str(threads), "--json", *extra]
    if ranks == 1:
        return [str(BIN / "python"), "-m", "rnnlm", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m", "rnnlm", *args]


def evaluate(model: Path, corpus: str, dynamic: float | None) -> float:
    prefix = "ptb." if corpus == "ptb" else "wiki."
    cmd = [str(BIN / "python"), "-m", "rnnlm", "eval", "--model", str(model), "--test",
           str(DATA / corpus / f"{prefix}test.txt"), "--json"]
    if dynamic:
        cmd += ["--dynamic", str(dynamic)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["perplexity"]


def speed(args) -> None:
    """Training words/s of the first epoch, 1 process × 1 thread then R ranks × 1 thread, in one run."""
    print(f"# speed, {args.corpus}, first epoch, H=200, 100 classes, BPTT 4; sync every {args.sync_words} words/rank")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, *args.ranks):
            before = uptime()
            out, seconds, _ = run_measured(train_command(ranks, args.corpus, Path(tmp) / "m.pt", 1,
                                           ["--max-epochs", "1", "--sync-words", str(args.sync_words)]))
            summary = json.loads(out)
            rates[ranks] = summary["history"][0]["train_words_per_sec"]
            print(f"{ranks} × 1 thread: {rates[ranks]:9,.0f} words/s ({rates[ranks] / rates[1]:.2f}× one process); "
                  f"wall {seconds:.1f} s | before: {before}")
    print(f"| after: {uptime()}")


def quality(args) -> None:
    """A whole training run, then test perplexity static and dynamic (α 0.01)."""
    extra = ["--sync-words", str(args.sync_words), "--merge", args.merge, "--seed", str(args.seed)]
    if args.max_epochs:
        extra += ["--max-epochs", str(args.max_epochs)]
    if args.lr:
        extra += ["--lr", str(args.lr)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m.pt"
        before = uptime()
        out, seconds, rss = run_measured(train_command(args.ranks, args.corpus, model, args.threads, extra))
        after = uptime()
        summary = json.loads(out)
        static = evaluate(model, args.corpus, None)
        dynamic = evaluate(model, args.corpus, 0.01)
    valid = " ".join(f"{h['valid_perplexity']:.1f}" for h in summary["history"])
    print(f"{args.corpus} {args.ranks} rank(s) × {args.threads} thread(s), merge {args.merge} every {args.sync_words} "
          f"words/rank, lr {args.lr or 0.1}, seed {args.seed}: test {static:.1f} static / {dynamic:.1f} dynamic; "
          f"{summary['epochs']} epochs in {seconds / 60:.2f} min wall ({summary['words_per_sec']:,.0f} words/s); "
          f"peak RSS of the largest process {rss / 1024:.0f} MB")
    print(f"  valid per epoch: {valid}")
    print(f"  before: {before}\n  after:  {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--corpus", default="ptb")
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--sync-words", type=int, default=16384)
    p.set_defaults(func=speed)
    p = sub.add_parser("quality")
    p.add_argument("--corpus", default="ptb")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sync-words", type=int, default=16384)
    p.add_argument("--merge", default="sparse-sum")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=None)
    p.set_defaults(func=quality)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
