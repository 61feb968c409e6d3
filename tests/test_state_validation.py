"""Every invariant of a model or daemon-state file is checked on load (rnnlm.checkpoint).

Hypothesis takes a real daemon checkpoint (two domains, three streams, written and read back as
files) and mutates one of its fields — any field: vocabulary lists, class count, config, weights,
stream states, counters — by deleting it, retyping it, growing or shrinking a list or a tensor,
changing a dtype, or writing an extreme value into it. Loading the result as the daemon's resume
does must either refuse it with a CheckpointError, or give a learner whose every domain and stream
scores every word of the vocabulary with finite log-probabilities.

It runs in a subprocess: the compiled step does not bounds-check, so a file that slips through can
kill the process with SIGSEGV; the test then fails on the exit status instead of taking pytest down.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

EXAMPLES = 400


def test_a_mutated_checkpoint_is_refused_or_scores_every_word(model_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tests.test_state_validation", str(model_path), str(tmp_path),
                        str(EXAMPLES)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("extra", [300_000, 1])
def test_counts_longer_than_the_words_are_refused_on_resume(model_path, tmp_path, extra, caplog):
    """The review's crafted file: zero counts appended, words and tensors unchanged."""
    from rnnlm.daemon.server import Server, ServeConfig
    from rnnlm.checkpoint import write_atomic

    state = tmp_path / "state"
    payload = real_state(model_path)
    good = dict(payload, model=dict(payload["model"]))
    write_atomic(state / "state-00000001.pt", good)
    payload["model"]["vocab"] = dict(payload["model"]["vocab"], counts=payload["model"]["vocab"]["counts"] + [0] * extra)
    write_atomic(state / "state-00000002.pt", payload)
    with caplog.at_level("WARNING"):
        learner = Server(ServeConfig(model=str(model_path), state_dir=str(state))).load_learner()
    assert "skipping" in caplog.text and "state-00000002.pt" in caplog.text and "'counts'" in caplog.text
    assert sorted(learner.domains) == ["d2", "default"]


@pytest.mark.parametrize("mutation", ["no_model", "zero_classes"])
def test_a_damaged_newest_checkpoint_is_skipped_not_fatal(model_path, tmp_path, mutation, caplog):
    from rnnlm.daemon.server import Server, ServeConfig
    from rnnlm.checkpoint import write_atomic

    state = tmp_path / "state"
    payload = real_state(model_path)
    write_atomic(state / "state-00000001.pt", payload)
    if mutation == "no_model":
        del payload["model"]
    else:
        payload["model"]["vocab"]["num_classes"] = 0
    write_atomic(state / "state-00000002.pt", payload)
    with caplog.at_level("WARNING"):
        learner = Server(ServeConfig(model=str(model_path), state_dir=str(state))).load_learner()
    assert "skipping" in caplog.text and "state-00000002.pt" in caplog.text
    assert learner.domains["default"].updates > 0


# --- the subprocess --------------------------------------------------------------------------------


def real_state(model_path) -> dict:
    """A daemon's checkpoint payload after some learning in two domains."""
    from rnnlm.checkpoint import load_model, VERSION
    from rnnlm.daemon.learner import STATE_FORMAT, Learner
    from rnnlm.daemon.protocol import Request
    from rnnlm.model import OnlineRule
    from tests.test_model import toy_text

    learner = Learner(load_model(model_path), OnlineRule(lr=0.01))
    for i, line in enumerate(toy_text(30, seed=5)):
        learner.score(Request("score", stream=f"s{i % 3}", domain="default" if i % 2 else "d2", sentences=[line.split()]))
    return {"format": STATE_FORMAT, "version": VERSION, **learner.to_payload()}


def paths(value, prefix=()):
    """Every field of a payload, as a path of keys and indices (tensors are leaves)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list) and len(value) <= 8:  # long lists (words, counts): mutated as a whole
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def get(value, path):
    for p in path:
        value = value[p]
    return value


def mutate(value, how, draw):
    """One change to one field."""
    if how == "delete":
        return DELETE
    if how == "retype":
        return draw(st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 9), st.floats(allow_nan=True),
                              st.text(max_size=4), st.just([]), st.just({})))
    if isinstance(value, torch.Tensor):
        if how == "dtype":
            return value.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.int64, torch.float32])))
        if how == "shape" and value.dim():
            axis = draw(st.integers(0, value.dim() - 1))
            n = value.shape[axis]
            grow = draw(st.booleans())
            return (torch.cat([value, value.narrow(axis, 0, 1)], axis) if grow or n <= 1 else value.narrow(axis, 0, n - 1))
        if value.numel():
            out = value.clone()
            extreme = draw(st.sampled_from([-1, 10 ** 6, 2 ** 31 - 1, float("nan"), float("inf"), -(2 ** 40)]))
            flat = out.view(-1)
            i = draw(st.integers(0, flat.numel() - 1))
            if out.is_floating_point() or isinstance(extreme, int):
                try:
                    flat[i] = extreme
                except RuntimeError:
                    pass
            return out
        return value
    if isinstance(value, list):
        if how == "shape":
            k = draw(st.integers(1, 300_000 if len(value) > 8 else 3))
            if draw(st.booleans()) or not value:
                filler = value[-1] if value else 0
                return value + [draw(st.sampled_from([0, 1, filler, "w", -1]))] * k
            return value[:-min(k, len(value))]
        if value and how in ("extreme", "dtype"):
            out = list(value)
            out[draw(st.integers(0, len(out) - 1))] = draw(st.sampled_from([-1, 0, 10 ** 9, "</s>", "<rare>", None, 1.5]))
            return out
        return value
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return draw(st.sampled_from([0, -1, 1, 2, 10 ** 6, 2 ** 63, value + 1, value - 1]))
    if isinstance(value, float):
        return draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e308]))
    if isinstance(value, str):
        return draw(st.sampled_from(["", "x" * 200, "</s>", "sqrt", "other", "default"]))
    return value


DELETE = object()


def mutated_copy(payload, path, new):
    import copy

    out = copy.deepcopy(payload)
    if not path:
        return new if new is not DELETE else {}
    parent = get(out, path[:-1])
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def load_and_score(payload, model_path) -> str:
    """'refused' or 'scored'; anything else raised is a failure of the checks."""
    from rnnlm.checkpoint import CheckpointError, load_model
    from rnnlm.daemon.learner import Learner, base_model_of
    from rnnlm.daemon.learner import NoRoom
    from rnnlm.daemon.protocol import Request
    from rnnlm.model import OnlineRule

    try:
        model = base_model_of(payload, "mutated")
        learner = Learner(model, OnlineRule(lr=0.01))
        learner.restore(payload, "mutated")
    except CheckpointError:
        return "refused"
    words = list(model.vocab.words)
    keys = [*((d, f"fresh-{d}") for d in learner.domains), *learner.streams.keys()]
    for domain, stream in keys:
        for learn in (False, True):
            try:
                result = learner.score(Request("score", stream=stream, domain=domain, tokens=words, learn=learn))
            except NoRoom:
                continue
            assert len(result.logprobs) == len(words)
            assert np.isfinite(result.logprobs).all() or not learn, (domain, stream)
    return "scored"


def main(model_path: str, tmp: str, examples: int) -> None:
    from pathlib import Path

    from rnnlm.checkpoint import read_checked, write_atomic
    from rnnlm.daemon.learner import STATE_FORMAT

    file = Path(tmp) / "real.pt"
    write_atomic(file, real_state(model_path))
    payload = read_checked(file, STATE_FORMAT)
    fields = list(paths(payload))
    outcomes = {"refused": 0, "scored": 0}

    @seed(12)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data):
        path = data.draw(st.sampled_from(fields))
        how = data.draw(st.sampled_from(["delete", "retype", "shape", "dtype", "extreme"]))
        target = get(payload, path)
        changed = mutated_copy(payload, path, mutate(target, how, data.draw))
        outcomes[load_and_score(changed, model_path)] += 1

    check()
    # The crafted file of the review, always: counts longer than the words.
    crafted = mutated_copy(payload, ("model", "vocab", "counts"), payload["model"]["vocab"]["counts"] + [0] * 300_000)
    assert load_and_score(crafted, model_path) == "refused"
    print(f"{examples} mutated checkpoints over {len(fields)} fields: {outcomes['refused']} refused, "
          f"{outcomes['scored']} loaded and scored every word; the crafted counts file refused")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
