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


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[str, float, dict[str, int]]:
    """stdout, wall seconds, and the peak RSS (kB, VmHWM) of each rank (or of the one process)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        peaks: dict[str, int] = {}
        import threading
        reader = threading.Thread(target=lambda: peaks.setdefault("_out", proc.stdout.read()))
        reader.start()
        while proc.poll() is None:
            for rank, kb in rank_peaks(proc.pid).items():
                peaks[rank] = max(peaks.get(rank, 0), kb)
            time.sleep(0.5)
        reader.join()
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
    out = peaks.pop("_out")
    return out, seconds, peaks


def rank_peaks(root: int) -> dict[str, int]:
    """VmHWM of `root` and its descendants that are ranks (RANK in their environment; root: "alone")."""
    found = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        todo += map(int, children)
        rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), "alone" if pid == root else None)
        hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
        if rank is not None:
            found[rank] = hwm
    return found


def train_command(ranks: int, corpus: str, out: Path, threads: int, extra: list[str],
                  train: Path | None = None) -> list[str]:
    data = DATA / corpus
    prefix = "ptb." if corpus == "ptb" else ""
    args = ["train", "--train", str(train or data / f"{prefix}train.txt"), "--valid", str(data / f"{prefix}valid.txt"),
            "--out", str(out), "--threads", str(threads), "--json", *extra]
    if ranks == 1:
        return [str(BIN / "python"), "-m", "rnnlm", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), "-m", "rnnlm", *args]


def evaluate(model: Path, corpus: str, dynamic: float | None) -> float:
    prefix = "ptb." if corpus == "ptb" else ""
    cmd = [str(BIN / "python"), "-m", "rnnlm", "eval", "--model", str(model), "--test",
           str(DATA / corpus / f"{prefix}test.txt"), "--json"]
    if dynamic:
        cmd += ["--dynamic", str(dynamic)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["perplexity"]


def first_lines(corpus: str, lines: int, folder: str) -> Path:
    prefix = "ptb." if corpus == "ptb" else ""
    part = Path(folder) / "train-part.txt"
    with open(DATA / corpus / f"{prefix}train.txt") as whole, open(part, "w") as out:
        for _, line in zip(range(lines), whole):
            out.write(line)
    return part


def speed(args) -> None:
    """Training words/s of the first epoch(s), 1 process × 1 thread and R ranks × 1 thread, alternating --repeat times;
    a rank's words/s counts its time in merges. With --evaluate, test perplexity of each model after
    those epochs (static / dynamic 0.01). --lines: train on the text's first lines only (quick)."""
    print(f"# speed, {args.corpus}{f', first {args.lines:,} lines' if args.lines else ''}, {args.epochs} epoch(s), "
          f"H=200, 100 classes, BPTT 4; merge {args.merge} every {args.sync_words} / {args.sync_all_words or 'default'} words/rank")
    rates: dict[int, list[float]] = {ranks: [] for ranks in (1, *args.ranks)}
    with tempfile.TemporaryDirectory() as tmp:
        train = first_lines(args.corpus, args.lines, tmp) if args.lines else None
        for _ in range(args.repeat):  # alternate, so a change in the machine's load hits every setting alike
            for ranks in rates:
                before = uptime()
                model = Path(tmp) / "m.pt"
                extra = ["--max-epochs", str(args.epochs), "--sync-words", str(args.sync_words), "--merge", args.merge]
                if args.sync_all_words:
                    extra += ["--sync-all-words", str(args.sync_all_words)]
                out, seconds, _ = run_measured(train_command(ranks, args.corpus, model, 1, extra, train))
                epochs = json.loads(out)["history"]  # training words/s, validation left out; every epoch has the same words
                rates[ranks].append(len(epochs) / sum(1 / e["train_words_per_sec"] for e in epochs))
                quality = ""
                if args.evaluate:
                    quality = (f"; test {evaluate(model, args.corpus, None):.1f} static / "
                               f"{evaluate(model, args.corpus, 0.01):.1f} dynamic")
                print(f"{ranks} × 1 thread: {rates[ranks][-1]:9,.0f} words/s; wall {seconds:.1f} s{quality} | before: {before}",
                      flush=True)
    median = {ranks: sorted(r)[len(r) // 2] for ranks, r in rates.items()}
    for ranks, m in median.items():
        print(f"median of {args.repeat}, {ranks} × 1 thread: {m:9,.0f} words/s ({m / median[1]:.2f}× one process)")
    print(f"| after: {uptime()}")


def quality(args) -> None:
    """A whole training run, then test perplexity static and dynamic (α 0.01)."""
    extra = ["--sync-words", str(args.sync_words), "--merge", args.merge, "--seed", str(args.seed)]
    if args.sync_all_words:
        extra += ["--sync-all-words", str(args.sync_all_words)]
    if args.dense_rate:
        extra += ["--dense-rate", str(args.dense_rate)]
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
    print(f"{args.corpus} {args.ranks} rank(s) × {args.threads} thread(s), merge {args.merge} every {args.sync_words} / "
          f"{args.sync_all_words or 'default'} words/rank, dense rate {args.dense_rate or 'default'}, lr {args.lr or 0.1}, seed {args.seed}: test {static:.1f} static / {dynamic:.1f} dynamic; "
          f"{summary['epochs']} epochs in {seconds / 60:.2f} min wall ({summary['words_per_sec']:,.0f} words/s); "
          f"peak RSS per rank: {', '.join(f'{r} {kb / 1024:.0f} MB' for r, kb in sorted(rss.items()))}")
    print(f"  valid per epoch: {valid}")
    print(f"  before: {before}\n  after:  {after}")


PTB_FLOATS = 2 * 10_000 * 200 + 200 * 200 + 100 * 200  # U, V, W, X of the PTB model (H=200, 100 classes)
SIZES = (1 << 20, PTB_FLOATS, 1 << 24, 1 << 26)


def allreduce_rank(args) -> None:
    """One rank: time all_reduce of float32 buffers of each size (median of --repeat)."""
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    for floats in SIZES:
        buffer = torch.ones(floats, dtype=torch.float32)
        times = []
        for i in range(args.repeat + 2):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if i >= 2:  # the first two connect and warm up
                times.append(time.perf_counter() - start)
        median = sorted(times)[len(times) // 2]
        if dist.get_rank() == 0:
            print(f"  {floats:>11,} floats ({floats * 4 / 1e6:7.1f} MB): {median * 1e3:8.2f} ms median of {len(times)}, "
                  f"{floats * 4 / median / 1e9:5.2f} GB/s", flush=True)
    # merges at PTB size, as in training: between merges each rank changes W, X, the frequent words'
    # rows of U and V (every --sync-words) or all rows (every --sync-all-words). A merge's own time
    # (the rank waits for the sum of the previous one, adds it, sends its deltas) and a settle's (sends
    # and waits for the sum), each median of --repeat.
    from rnnlm.corpus import read_tokens
    from rnnlm.distributed import FREQUENT_SHARE, WeightMerger, all_reduce_sum, frequent_rows, start_all_reduce
    from rnnlm.model import Weights
    from rnnlm.vocab import Vocabulary
    words = read_tokens(str(DATA / "ptb" / "ptb.train.txt"))
    frequent = frequent_rows(Vocabulary.build(words, num_classes=100), FREQUENT_SHARE)
    rank = dist.get_rank()
    parts = {f"W, X and U, V rows 0-{frequent - 1}": {"U": slice(0, frequent), "W": slice(None), "V": slice(0, frequent), "X": slice(None)},
             f"U, V rows {frequent}-9999": {"U": slice(frequent, None), "V": slice(frequent, None)}}
    for label, rows in parts.items():
        weights = Weights.random(10_000, 200, 100, 0.1, seed=0)
        merger = WeightMerger(weights, dist.get_world_size(), rows=rows)
        timed = {"merge": [], "settle": []}
        for i in range(args.repeat + 2):
            for part in merger.parts(weights).values():
                part += 1e-4
            dist.barrier()
            start = time.perf_counter()
            if i % 2:
                merger.settle(weights, all_reduce_sum)
            else:
                merger.merge(weights, start_all_reduce)
            if i >= 2:
                timed["settle" if i % 2 else "merge"].append(time.perf_counter() - start)
        if rank == 0:
            floats = merger.flat.numel()
            print(f"  {label} ({floats:,} floats): overlapped merge {sorted(timed['merge'])[len(timed['merge']) // 2] * 1e3:.2f} ms, "
                  f"settle {sorted(timed['settle'])[len(timed['settle']) // 2] * 1e3:.2f} ms (medians)", flush=True)
    dist.destroy_process_group()


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def allreduce(args) -> None:
    """all_reduce between 2 ranks: on loopback, then between two network namespaces over a veth pair."""
    me = [str(Path(__file__).resolve()), "allreduce-rank", "--repeat", str(args.repeat)]
    print(f"# all_reduce, 2 ranks, gloo; PTB model = {PTB_FLOATS:,} floats | before: {uptime()}")
    print("loopback (torchrun --standalone):")
    out = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *me],
                         capture_output=True, text=True, check=True).stdout
    print(out, end="")
    hosts = [("rnnlmbencha", "rnnlmva", "10.214.0.1"), ("rnnlmbenchb", "rnnlmvb", "10.214.0.2")]
    try:
        for ns, _, _ in hosts:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", hosts[0][1], "netns", hosts[0][0], "type", "veth", "peer", "name", hosts[1][1],
           "netns", hosts[1][0])
        for ns, veth, addr in hosts:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up")
        print("veth pair between two network namespaces (torchrun --nnodes 2, c10d rendezvous):")
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node",
                                   "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{hosts[0][2]}:29412",
                                   "--rdzv-id", "bench", "--rdzv-conf", f"is_host={str(i == 0).lower()}",
                                   "--local-addr", addr, *me], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "GLOO_SOCKET_IFNAME": veth})
                 for i, (ns, veth, addr) in enumerate(hosts)]
        print("".join(p.communicate()[0] for p in procs), end="")
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    print(f"| after: {uptime()}")


def rank_speed(args) -> None:
    """One rank's training words/s (1 thread) for a vocabulary of the given size: Zipf-distributed counts
    and text (exponent 1), frequency classes, H=200, BPTT 4 in blocks of 10. For the One Billion Word
    projection (V=793,471; ~√V classes), where the real corpus cannot be trained here."""
    import numpy as np

    from rnnlm.model import RNNLM, Config, OnlineRule
    from rnnlm.vocab import RARE, Vocabulary
    rng = np.random.default_rng(0)
    counts = (1e9 / np.arange(1, args.vocab + 1)).astype(np.int64) + 1
    words = ["</s>", RARE] + [f"w{i}" for i in range(args.vocab - 2)]
    vocab = Vocabulary(words, counts.tolist(), frozenset(), args.classes)
    model = RNNLM.create(Config(hidden=200, classes=args.classes), vocab)
    p = counts / counts.sum()
    ids = rng.choice(args.vocab, size=args.words, p=p).astype(np.int32)
    rule = OnlineRule(lr=0.1, l2=1e-7, bptt=4, block=10)
    state = model.new_state(rule)
    model.step(ids[:1000], state, rule)  # compile / warm up
    before = uptime()
    start = time.perf_counter()
    model.step(ids[1000:], state, rule)
    seconds = time.perf_counter() - start
    print(f"V={args.vocab:,}, {vocab.num_classes} classes, H=200: {(args.words - 1000) / seconds:,.0f} words/s "
          f"(one thread, {args.words - 1000:,} words of Zipf text) | before: {before} | after: {uptime()}")


def project(args) -> None:
    """PROJECTED epoch time on One Billion Word from measured inputs: a rank's words/s at that
    vocabulary (rankspeed) and all_reduce bandwidth (allreduce). A merge moves the whole model; gloo's
    ring all_reduce over N ranks sends 2(N-1)/N of it per rank, which is 1 at N=2 (what was measured)."""
    floats = 2 * args.vocab * 200 + 200 * 200 + args.classes * 200
    gbytes = floats * 4 / 1e9
    print(f"# PROJECTED, not measured: One Billion Word, {args.words:,} training words, V={args.vocab:,}, "
          f"{args.classes} classes, H=200 ({gbytes:.2f} GB of weights); {args.rank_wps:,.0f} words/s per rank "
          f"(measured, one thread); all_reduce at {args.gbps} GB/s (measured between two ranks)")
    print("| ranks | sync every (words/rank) | compute h | merges | merge s each | communication h | epoch h |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for sync_words in args.sync_words:
        for ranks in (1, 8, 32, 128):
            per_rank = args.words / ranks
            compute = per_rank / args.rank_wps / 3600
            merges = 0 if ranks == 1 else int(per_rank // sync_words)
            each = 0.0 if ranks == 1 else gbytes / args.gbps * 2 * (ranks - 1) / ranks
            comm = merges * each / 3600
            print(f"| {ranks} | {sync_words:,} | {compute:.1f} | {merges:,} | {each:.2f} | {comm:.1f} | {compute + comm:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    from rnnlm.distributed import SYNC_WORDS
    p = sub.add_parser("speed")
    p.add_argument("--corpus", default="ptb")
    p.add_argument("--ranks", type=int, nargs="+", default=[2])
    p.add_argument("--sync-words", type=int, default=SYNC_WORDS)
    p.add_argument("--sync-all-words", type=int, default=None, help="default: rnnlm train's")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--lines", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--merge", default="sparse-sum")
    p.set_defaults(func=speed)
    p = sub.add_parser("quality")
    p.add_argument("--corpus", default="ptb")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sync-words", type=int, default=SYNC_WORDS)
    p.add_argument("--sync-all-words", type=int, default=None, help="default: rnnlm train's")
    p.add_argument("--dense-rate", type=float, default=None, help="default: rnnlm train's")
    p.add_argument("--merge", default="sparse-sum")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=None)
    p.set_defaults(func=quality)
    p = sub.add_parser("allreduce")
    p.add_argument("--repeat", type=int, default=9)
    p.set_defaults(func=allreduce)
    p = sub.add_parser("allreduce-rank")
    p.add_argument("--repeat", type=int, default=9)
    p.set_defaults(func=allreduce_rank)
    p = sub.add_parser("rankspeed")
    p.add_argument("--vocab", type=int, default=793_471)
    p.add_argument("--classes", type=int, default=891)
    p.add_argument("--words", type=int, default=101_000)
    p.set_defaults(func=rank_speed)
    p = sub.add_parser("project")
    p.add_argument("--words", type=int, default=768_648_884)
    p.add_argument("--vocab", type=int, default=793_471)
    p.add_argument("--classes", type=int, default=891)
    p.add_argument("--rank-wps", type=float, required=True)
    p.add_argument("--gbps", type=float, required=True)
    p.add_argument("--sync-words", type=int, nargs="+", default=[16384, 262144])
    p.set_defaults(func=project)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
