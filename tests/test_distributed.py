"""`rnnlm train` on torch.distributed: real torchrun, real gloo over loopback (and a veth pair between
two network namespaces), real files, real SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rnnlm.checkpoint import load_model
from rnnlm.corpus import read_tokens
from rnnlm.distributed import WeightMerger, sentence_bounds, sentence_parts
from rnnlm.evaluate import evaluate
from rnnlm.model import Weights
from rnnlm.resume import load_training

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKER = ROOT / "tests" / "distributed_worker.py"
TRAIN_OPTIONS = ["--hidden", "16", "--classes", "5", "--max-epochs", "4", "--threads", "1", "--sync-words", "250",
                 "--sync-all-words", "1000"]


def markov_text(sentences: int, seed: int) -> list[str]:
    """A made-up language with structure to learn: 60 words, each followed by one of 3 likely ones."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(60)]
    follow = np.random.default_rng(7).integers(0, 60, size=(60, 3))  # the same language for every seed
    lines = []
    for _ in range(sentences):
        w = int(rng.integers(60))
        line = [words[w]]
        for _ in range(int(rng.integers(3, 12))):
            w = int(follow[w, rng.integers(3)]) if rng.random() < 0.9 else int(rng.integers(60))
            line.append(words[w])
        lines.append(" ".join(line))
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("corpus")
    files = {}
    for name, sentences, seed in (("train", 2500, 1), ("valid", 300, 2), ("test", 300, 3)):
        files[name] = tmp / f"{name}.txt"
        files[name].write_text("\n".join(markov_text(sentences, seed)) + "\n")
    return files


def torchrun(*args, nproc: int = 2, extra: tuple = (), **kwargs) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), *extra, *map(str, args)]


def run(cmd: list[str], timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_args(corpus, out: Path, *more) -> list[str]:
    return ["train", "--train", corpus["train"], "--valid", corpus["valid"], "--out", out, *TRAIN_OPTIONS, *more]


# --- the parts of the text ---------------------------------------------------------------------------

def test_the_text_is_cut_into_whole_sentences_of_nearly_equal_length():
    rng = np.random.default_rng(0)
    eos = 0
    ids = np.concatenate([np.append(rng.integers(1, 50, size=rng.integers(1, 30)), eos) for _ in range(500)])
    for parts in (1, 2, 3, 8):
        pieces = sentence_parts(ids, eos, parts)
        assert len(pieces) == parts
        np.testing.assert_array_equal(np.concatenate(pieces), ids)  # all of it, in order, once
        assert all(p[-1] == eos for p in pieces)  # every part ends a sentence
        sizes = [len(p) for p in pieces]
        assert max(sizes) - min(sizes) <= 2 * 31, sizes  # within a sentence or two of even


def test_more_parts_than_sentences_leaves_some_empty_but_loses_nothing():
    bounds = sentence_bounds(np.array([False, True, False, True]), 3)
    assert bounds[0][0] == 0 and bounds[-1][1] == 4
    assert all(a <= b for a, b in bounds) and all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))


# --- the merge arithmetic ----------------------------------------------------------------------------

def summing_group(ranks: int) -> list:
    """In-process stand-ins for all_reduce, one per rank, each run in its own thread: every rank's
    tensor becomes the sum of all ranks' tensors."""
    barrier, slots = threading.Barrier(ranks), [None] * ranks

    def reduce_for(rank):
        def reduce(tensor):
            slots[rank] = tensor
            barrier.wait()
            total = sum(t.clone() for t in slots)
            barrier.wait()  # every rank has its sum before any rank overwrites its own tensor
            tensor.copy_(total)
        return reduce
    return [reduce_for(r) for r in range(ranks)]


class Done:
    def wait(self) -> None:
        pass


def move(weights: Weights, rank: int, round_: int) -> None:
    """Rank `rank` moves every third row (a different third per rank); the last 2 rows: no rank."""
    noise = Weights.random(30, 6, 4, 0.1, seed=100 + 10 * round_ + rank)
    for name in Weights.NAMES:
        getattr(weights, name)[rank:-2:3] += getattr(noise, name)[rank:-2:3]


def simulated_merge(rule: str, ranks: int) -> tuple[list[list[Weights]], list[Weights], Weights]:
    """Each rank moves some rows away from a common base, merges (the sum arrives later), moves
    again, merges, and settles; as through gloo, each rank in its own thread. Returns each rank's
    weights after each move, after the first merge, and the base."""
    base = Weights.random(30, 6, 4, 0.1, seed=0)
    weights = [base.copy() for _ in range(ranks)]
    moved = [[] for _ in range(ranks)]
    after_first = [None] * ranks

    def rank_(r: int, reduce) -> None:
        merger = WeightMerger(weights[r], ranks, rule)
        start = lambda tensor: (reduce(tensor), Done())[1]  # noqa: E731 (summed at once; waited for later)
        for round_ in range(2):
            move(weights[r], r, round_)
            moved[r].append(weights[r].copy())
            merger.merge(weights[r], start)
            if round_ == 0:
                after_first[r] = weights[r].copy()
        merger.settle(weights[r], reduce)

    threads = [threading.Thread(target=rank_, args=(r, reduce)) for r, reduce in enumerate(summing_group(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return moved, after_first, weights, base


def expected_merge(rule: str, moved: list[list[Weights]], base: Weights) -> dict[str, np.ndarray]:
    """base + each round's deltas of every rank: summed (U, V under sparse-sum) or averaged."""
    n = len(moved)
    want = {}
    for name in Weights.NAMES:
        total = getattr(base, name).astype(np.float64)
        for round_ in range(len(moved[0])):
            before = [getattr(base, name)] * n if round_ == 0 else [getattr(m[round_ - 1], name) for m in moved]
            deltas = sum(getattr(m[round_], name).astype(np.float64) - b for m, b in zip(moved, before))
            total = total + (deltas if rule == "sparse-sum" and name in ("U", "V") else deltas / n)
        want[name] = total
    return want


@pytest.mark.parametrize("rule", ["sparse-sum", "mean"])
def test_merging_keeps_every_ranks_sparse_updates_and_averages_the_dense_ones(rule):
    moved, after_first, after, base = simulated_merge(rule, ranks=3)
    want = expected_merge(rule, moved, base)
    for name in Weights.NAMES:
        for w in after:
            assert np.array_equal(getattr(w, name), getattr(after[0], name)), name  # the same bits on every rank
            np.testing.assert_allclose(getattr(w, name), want[name], rtol=1e-5, atol=1e-6, err_msg=f"{rule} {name}")
    # the first merge's sum arrives at the next merge: until then a rank holds only its own moves
    for r in range(3):
        np.testing.assert_allclose(after_first[r].U, moved[r][0].U, rtol=1e-6, atol=1e-7)
    # a row only rank 0 moved keeps rank 0's whole update under sparse-sum, a third of it under mean
    row = 3
    got, own = after[0].U[row] - base.U[row], moved[0][1].U[row] - base.U[row]
    np.testing.assert_allclose(got, own if rule == "sparse-sum" else own / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after[0].U[-2:], base.U[-2:])  # rows nobody moved stay as they were


def test_a_merger_of_some_rows_leaves_the_others_to_each_rank():
    base = Weights.random(30, 6, 4, 0.1, seed=0)
    weights = [base.copy() for _ in range(2)]
    reduces = summing_group(2)

    def rank_(r):
        merger = WeightMerger(weights[r], 2, "sparse-sum", {"U": slice(0, 12), "W": slice(None)})
        move(weights[r], r, 0)
        merger.settle(weights[r], reduces[r])

    threads = [threading.Thread(target=rank_, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(weights[0].U[:12], weights[1].U[:12]) and np.array_equal(weights[0].W, weights[1].W)
    assert not np.array_equal(weights[0].U[12:], weights[1].U[12:])  # not merged: each rank's own
    assert not np.array_equal(weights[0].V, weights[1].V)


def test_the_frequent_rows_end_at_a_class_boundary_and_cover_the_share():
    from rnnlm.distributed import frequent_rows
    from rnnlm.vocab import Vocabulary
    words = [f"w{int(i)}" for i in np.random.default_rng(0).zipf(1.3, 20000) if i < 2000]
    vocab = Vocabulary.build(words, num_classes=20)
    rows = frequent_rows(vocab, 0.8)
    assert rows in set(vocab.class_end.tolist())
    assert sum(vocab.counts[:rows]) >= 0.8 * sum(vocab.counts)
    previous = vocab.class_start[vocab.class_of[rows - 1]]
    assert sum(vocab.counts[:previous]) < 0.8 * sum(vocab.counts)  # one class fewer would not cover it
    assert frequent_rows(vocab, 1.0) == len(vocab)


@pytest.fixture(scope="module")
def merged_through_gloo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merge")
    run(torchrun(WORKER, "merge", out))
    return out


@pytest.mark.parametrize("rule", ["sparse-sum", "mean"])
def test_a_merge_through_gloo_gives_every_rank_the_same_bits_and_the_expected_values(merged_through_gloo, rule):
    ranks = [np.load(merged_through_gloo / f"{rule}-rank{r}.npz") for r in range(2)]
    moved = [[Weights(*(r[f"moved{k}_{n}"] for n in Weights.NAMES)) for k in range(2)] for r in ranks]
    base = Weights(*(ranks[0][f"base_{n}"] for n in Weights.NAMES))
    want = expected_merge(rule, moved, base)
    for name in Weights.NAMES:
        assert np.array_equal(ranks[0][name], ranks[1][name]), name
        np.testing.assert_allclose(ranks[0][name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_merging_all_rows_less_often_than_the_frequent_ones_is_the_only_order_accepted(tmp_path, corpus):
    result = subprocess.run([str(BIN / "rnnlm"), *train_args(corpus, tmp_path / "m.pt"), "--sync-all-words", "100"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "--sync-all-words" in result.stderr and "less than --sync-words 250" in result.stderr
    assert not (tmp_path / "m.pt").exists()


# --- training under torchrun -------------------------------------------------------------------------

def test_two_ranks_end_with_bit_identical_weights(tmp_path, corpus):
    run(torchrun(WORKER, "train", tmp_path, corpus["train"], corpus["valid"], 500))
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for name in Weights.NAMES:
        assert np.array_equal(ranks[0][name], ranks[1][name]), name
    assert ranks[0]["valid_loss"] == ranks[1]["valid_loss"]  # summed validation: the same decision on both


CHECKPOINTED = ("--checkpoint-words", "1000", "--resume")


@pytest.fixture(scope="module")
def one_process_model(tmp_path_factory, corpus) -> Path:
    tmp = tmp_path_factory.mktemp("one")
    run([str(BIN / "rnnlm"), *train_args(corpus, tmp / "m.pt", "--checkpoint", tmp / "ckpt", *CHECKPOINTED)])
    return tmp / "m.pt"


@pytest.fixture(scope="module")
def two_rank_model(tmp_path_factory, corpus) -> tuple[Path, str]:
    """`rnnlm train` under torchrun, checkpointing as it goes; the model file and stdout."""
    tmp = tmp_path_factory.mktemp("two")
    result = run([*torchrun("-m", "rnnlm"), *train_args(corpus, tmp / "m.pt", "--json", "--checkpoint", tmp / "ckpt",
                                                         *CHECKPOINTED)])
    return tmp / "m.pt", result.stdout


def test_two_ranks_under_torchrun_learn_as_well_as_one_process(corpus, one_process_model, two_rank_model):
    """Tolerance: test perplexity of the two-rank model within 3 % of one process's on the same text."""
    out, stdout = two_rank_model
    assert stdout.count('"epochs"') == 1  # rank 0 alone reports
    test = read_tokens(corpus["test"])
    two, one = load_model(out), load_model(one_process_model)
    ppl_two, ppl_one = evaluate(two, test).perplexity, evaluate(one, test).perplexity
    assert ppl_one < 0.5 * len(one.vocab), ppl_one  # one process did learn
    assert ppl_two < 1.03 * ppl_one, (ppl_two, ppl_one)
    # W and X learned at ranks/8 of α under torchrun (see default_dense_rate), at α alone; the file says so
    assert (two.config.dense_rate, one.config.dense_rate) == (0.25, 1.0)


# --- checkpoints and resume --------------------------------------------------------------------------

def worker_pids(agent: int) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes."""
    found = {}
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = pid
    return found


def inside_an_epoch(checkpoint: Path) -> bool:
    """The checkpoint exists and was taken inside an epoch (files are replaced whole: a read sees one)."""
    return checkpoint.exists() and load_training(checkpoint)["runs"] is not None


def kill_when_checkpointed(cmd: list[str], checkpoint: Path, victim) -> subprocess.CompletedProcess:
    """Run `cmd`; once it has written a checkpoint inside an epoch, SIGKILL victim(pid of cmd) and
    let it go on. The victim is stopped first and the checkpoint read again (a write under way
    lands meanwhile), so that a slow poll cannot kill it after an epoch's end instead."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint inside an epoch before the run ended"
            if inside_an_epoch(checkpoint):
                pid = victim(proc.pid)
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.2)
                if inside_an_epoch(checkpoint):
                    break
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_a_group_with_a_killed_rank_comes_back_and_ends_as_if_nothing_happened(tmp_path, corpus, two_rank_model):
    reference = two_rank_model[0]
    out, checkpoint = tmp_path / "m.pt", tmp_path / "train.ckpt"
    cmd = [*torchrun("-m", "rnnlm", extra=("--max-restarts", "1")),
           *train_args(corpus, out, "--checkpoint", checkpoint, *CHECKPOINTED)]
    result = kill_when_checkpointed(cmd, checkpoint, lambda agent: worker_pids(agent)[1])
    assert result.returncode == 0, result.stderr[-5000:]
    assert "resumed from" in result.stderr, result.stderr[-3000:]
    a, b = load_model(out), load_model(reference)
    for name in Weights.NAMES:
        assert np.array_equal(getattr(a.weights, name), getattr(b.weights, name)), name


def test_one_process_killed_mid_run_resumes_to_the_same_model(tmp_path, corpus, one_process_model):
    out, checkpoint = tmp_path / "m.pt", tmp_path / "train.ckpt"
    cmd = [str(BIN / "rnnlm"), *train_args(corpus, out, "--checkpoint", checkpoint, *CHECKPOINTED)]
    killed = kill_when_checkpointed(cmd, checkpoint, lambda pid: pid)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert load_training(checkpoint)["runs"] is not None, "the kill should come inside an epoch"
    result = run(cmd)
    assert "resumed from" in result.stderr
    a, b = load_model(out), load_model(one_process_model)
    for name in Weights.NAMES:
        assert np.array_equal(getattr(a.weights, name), getattr(b.weights, name)), name


# --- two hosts: two network namespaces joined by a veth pair -----------------------------------------

def sh(*args) -> str:
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def two_hosts():
    """Namespaces A (10.213.0.1) and B (10.213.0.2), one veth pair between them; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if not shutil.which("ip"):
        pytest.fail("ip is missing: install iproute2")
    tag = f"r{os.getpid() % 100000}"
    hosts = [(f"{tag}a", f"{tag}va", "10.213.0.1"), (f"{tag}b", f"{tag}vb", "10.213.0.2")]
    try:
        for ns, _, _ in hosts:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        (ns_a, veth_a, _), (ns_b, veth_b, _) = hosts
        sh("ip", "link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
        for ns, veth, addr in hosts:
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its end of the veth pair along


def veth_bytes(ns: str, veth: str) -> int:
    stats = [f"/sys/class/net/{veth}/statistics/{d}_bytes" for d in ("tx", "rx")]
    return sum(int(v) for v in sh("ip", "netns", "exec", ns, "cat", *stats).split())


def test_two_hosts_train_together_through_a_network_interface(tmp_path, corpus, two_hosts):
    """Each 'host' is a network namespace with only lo and its end of the veth pair, so everything
    the two ranks exchange (rendezvous, all_reduce) has to cross the veth pair."""
    (ns_a, _, addr_a), _ = two_hosts
    before = {ns: veth_bytes(ns, veth) for ns, veth, _ in two_hosts}
    out = tmp_path / "m.pt"
    nodes = []
    for ns, veth, addr in two_hosts:
        # torchrun cannot tell that 10.213.0.1 is A's own address: say which host keeps the rendezvous
        cmd = ["ip", "netns", "exec", ns, str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{addr_a}:29411", "--rdzv-id", "netns-test",
               "--rdzv-conf", f"is_host={str(ns == ns_a).lower()}", "--local-addr", addr, "-m", "rnnlm", *map(str, train_args(corpus, out))]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": veth}
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    try:
        results = [n.communicate(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-5000:]
    model = load_model(out)
    weights_bytes = sum(a.nbytes for a in model.weights.arrays().values())
    words_per_rank = len(read_tokens(corpus["train"])) / 2
    merges_per_epoch = int(words_per_rank // 500)
    epochs = 4
    for ns, veth, _ in two_hosts:
        crossed = veth_bytes(ns, veth) - before[ns]
        # every merge sends and receives about the whole model once (gloo's ring over two ranks)
        assert crossed > merges_per_epoch * epochs * weights_bytes, (ns, crossed, weights_bytes)


# --- the Kubernetes job ------------------------------------------------------------------------------

TRAINING_JOB = ROOT / "deploy" / "k8s" / "training" / "job.yaml"


def training_objects() -> dict[str, dict]:
    import yaml
    return {d["kind"]: d for d in yaml.safe_load_all(TRAINING_JOB.read_text()) if d}


def test_kubernetes_validate_accepts_the_training_job():
    """Offline, against the OpenAPI schemas bundled in kubernetes-validate; strict: unknown fields fail."""
    from tests.test_deploy import tool
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--no-warn", str(TRAINING_JOB)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.count("passed") == 3, result.stdout + result.stderr


def test_the_training_job_runs_a_command_torchrun_and_rnnlm_train_accept():
    import shlex

    from torch.distributed.run import get_args_parser

    from rnnlm.cli import train as train_command
    objects = training_objects()
    job, service, pvc = objects["Job"], objects["Service"], objects["PersistentVolumeClaim"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    nodes = int(env["NODES"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    # the rendezvous endpoint is pod 0 by its DNS name under the headless Service
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    shell = container["args"][0].replace('"$NODES"', str(nodes))
    shell = shell.replace('"is_host=$([ "$JOB_COMPLETION_INDEX" = 0 ] && echo true || echo false)"', "is_host=true")
    words = shlex.split(shell)
    assert words[:2] == ["exec", "torchrun"]
    launcher = get_args_parser().parse_args(words[2:])
    assert launcher.nnodes == str(nodes) and launcher.rdzv_backend == "c10d" and launcher.module
    assert launcher.rdzv_endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:29400"
    assert launcher.training_script == "rnnlm" and launcher.training_script_args[0] == "train"
    ctx = train_command.make_context("train", list(launcher.training_script_args[1:]))
    assert ctx.params["resume"] and ctx.params["checkpoint"]  # a restarted pod goes on from the checkpoint
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["training"]
    for option in ("train_file", "valid_file", "out", "checkpoint"):
        assert ctx.params[option].startswith(mount + "/"), option
    claim = {v["name"]: v for v in pod["volumes"]}["training"]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_a_finished_run_resumed_with_more_epochs_ends_as_the_longer_run(tmp_path, corpus, one_process_model):
    out, checkpoint = tmp_path / "m.pt", tmp_path / "train.ckpt"
    run([str(BIN / "rnnlm"), *train_args(corpus, out, "--checkpoint", checkpoint, "--max-epochs", "2")])
    result = run([str(BIN / "rnnlm"), *train_args(corpus, out, "--checkpoint", checkpoint, "--resume")])
    assert "resumed from" in result.stderr and "at epoch 3" in result.stderr, result.stderr[-2000:]
    a, b = load_model(out), load_model(one_process_model)
    for name in Weights.NAMES:
        assert np.array_equal(getattr(a.weights, name), getattr(b.weights, name)), name


def test_a_direct_model_resumed_with_more_epochs_ends_as_the_longer_run(tmp_path, corpus):
    direct = ("--direct", "0.01", "--direct-order", "3", "--direct-l2", "1e-4")
    whole, out, checkpoint = tmp_path / "whole.pt", tmp_path / "m.pt", tmp_path / "train.ckpt"
    run([str(BIN / "rnnlm"), *train_args(corpus, whole, *direct, "--max-epochs", "3")])
    run([str(BIN / "rnnlm"), *train_args(corpus, out, *direct, "--checkpoint", checkpoint, "--max-epochs", "2")])
    result = run([str(BIN / "rnnlm"), *train_args(corpus, out, *direct, "--checkpoint", checkpoint,
                                                   "--max-epochs", "3", "--resume")])
    assert "resumed from" in result.stderr, result.stderr[-2000:]
    a, b = load_model(out), load_model(whole)
    assert a.weights.D.any()
    for name in (*Weights.NAMES, "D"):
        assert np.array_equal(getattr(a.weights, name), getattr(b.weights, name)), name
