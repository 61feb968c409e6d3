"""A model with direct connections (RNNME) in the daemon: it serves, adapts per domain, checkpoints
and resumes, and streaming it equals `rnnlm eval --dynamic` with it."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from rnnlm.checkpoint import load_model, save_model
from rnnlm.clients.client import Client
from rnnlm.model import RNNLM, Config
from rnnlm.train import train
from rnnlm.vocab import Vocabulary
from tests.daemon_helpers import Daemon
from tests.test_model import toy_text


@pytest.fixture(scope="module")
def direct_model_path(tmp_path_factory):
    lines = toy_text(300, seed=2)
    words = [w for line in lines for w in line.split() + ["</s>"]]
    config = Config(hidden=12, classes=4, max_epochs=3, direct=0.01, direct_order=3, direct_l2=1e-4)
    model = RNNLM.create(config, Vocabulary.build(words, 1, 4))
    train(model, words[:1500], words[1500:])
    assert model.weights.D.any()
    path = tmp_path_factory.mktemp("direct") / "rnnme.pt"
    save_model(model, path)
    return path


def test_streaming_a_direct_model_equals_rnnlm_eval_dynamic(tmp_path, direct_model_path):
    lines = toy_text(120, seed=7)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    offline = json.loads(subprocess.run(
        [sys.executable, "-m", "rnnlm", "eval", "--model", str(direct_model_path), "--test", str(text),
         "--dynamic", "0.01", "--json"], capture_output=True, text=True, check=True).stdout)
    with Daemon(tmp_path, direct_model_path) as d, Client(d.endpoint) as c:
        replies = list(c.pipeline(({"op": "score", "stream": "s", "domain": "news", "text": l} for l in lines), window=16))
        assert d.stop() == 0
    assert sum(r["tokens"] for r in replies) == offline["words"]
    streamed = sum(r["loss"] for r in replies)
    assert streamed == pytest.approx(offline["loss_nats"], rel=1e-6)


def test_a_direct_model_adapts_per_domain_checkpoints_and_resumes(tmp_path, direct_model_path):
    state = tmp_path / "state"
    probe = "the ball eats the cat"
    with Daemon(tmp_path, direct_model_path, state_dir=state) as d, Client(d.endpoint) as c:
        base = c.score(probe, stream="p0", domain="a", learn=False)["logprobs"]
        for _ in range(30):
            c.score(probe, stream="learner", domain="a")
        adapted = c.score(probe, stream="p1", domain="a", learn=False)["logprobs"]
        other = c.score(probe, stream="p2", domain="b", learn=False)["logprobs"]
        assert d.stop(signal.SIGTERM) == 0
    assert sum(adapted) > sum(base) + 1.0
    np.testing.assert_array_equal(other, base)  # domain b never learned: it still has the model's weights
    with Daemon(tmp_path, direct_model_path, state_dir=state) as d, Client(d.endpoint) as c:
        assert "resumed" in d.output()
        resumed = c.score(probe, stream="p3", domain="a", learn=False)["logprobs"]
        assert d.stop() == 0
    np.testing.assert_allclose(resumed, adapted, rtol=0, atol=1e-9)


def test_the_daemons_domains_save_only_the_blocks_of_a_large_hash_they_wrote(tmp_path):
    """Three adapted domains of a model with 4 M direct weights (16 MB): the state file holds the
    model once and each domain's few written blocks, and resuming gives the same scores."""
    words = [w for line in toy_text(100, seed=3) for w in line.split() + ["</s>"]]
    model = RNNLM.create(Config(hidden=12, classes=4, direct=4.0, direct_order=3), Vocabulary.build(words, 1, 4))
    model.weights.D[:] = np.random.default_rng(1).normal(scale=0.1, size=model.weights.D.shape)
    path = tmp_path / "big.pt"
    save_model(model, path)
    state = tmp_path / "state"
    probe = "the ball eats the cat"
    with Daemon(tmp_path, path, state_dir=state) as d, Client(d.endpoint) as c:
        for domain in ("a", "b", "c"):
            for line in toy_text(20, seed=ord(domain)):
                c.score(line, stream=domain, domain=domain)
        adapted = [c.score(probe, stream="p" + domain, domain=domain, learn=False)["logprobs"] for domain in "abc"]
        assert d.stop(signal.SIGTERM) == 0
    saved = sum(f.stat().st_size for f in state.iterdir())
    assert saved < path.stat().st_size + 3 * 2 ** 20  # a full copy per domain would add 48 MB
    with Daemon(tmp_path, path, state_dir=state) as d, Client(d.endpoint) as c:
        assert "resumed" in d.output()
        resumed = [c.score(probe, stream="q" + domain, domain=domain, learn=False)["logprobs"] for domain in "abc"]
        assert d.stop() == 0
    np.testing.assert_allclose(resumed, adapted, rtol=0, atol=1e-9)
