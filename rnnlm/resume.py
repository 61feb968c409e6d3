"""Training checkpoints: where a training run stands, so that `rnnlm train --resume` goes on from it.

A training checkpoint is written after every epoch and, with `--checkpoint-words`, at pauses inside
an epoch (in a run of several processes, the pauses where they have just merged their weights).
It holds the model (config, vocabulary, weights), the weights the epoch started from (restored if
validation gets worse), the schedule (epoch, α, halving, best validation), the history, and, inside
an epoch, each process's position, hidden states and tally. Nothing is random after the initial
weights (drawn from the config's seed), so that is the whole state: a run resumed from a checkpoint
computes what the uninterrupted run would have, bit for bit, when every process runs one thread.

The file is written and read like a model file (rnnlm/checkpoint.py): atomically, weights_only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .checkpoint import (VERSION, CheckpointError, check_stream_arrays, model_payload, read_checked,
                         weights_from_tensors, weights_to_tensors, write_atomic)
from .evaluate import Tally
from .model import StreamState
from .train import EpochReport, EpochRun, Trainer

TRAINING_FORMAT = "rnnlm-training"
STATE_ARRAYS = ("hidden", "inputs", "errors", "meta")
TALLY_FIELDS = ("words", "oov", "rare", "loss_nats", "seconds")


def text_digest(words: list[str]) -> str:
    """Identifies the training text, so a checkpoint is not resumed on another one."""
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def tally_to_state(tally: Tally | None) -> dict | None:
    return None if tally is None else {f: getattr(tally, f) for f in TALLY_FIELDS}


def tally_from_state(state: dict | None) -> Tally | None:
    return None if state is None else Tally(**{f: state[f] for f in TALLY_FIELDS})


def run_to_state(run: EpochRun) -> dict:
    """What one process adds to a checkpoint taken inside an epoch."""
    return {
        "position": run.position,
        "tally": tally_to_state(run.tally),
        "states": [{name: torch.from_numpy(getattr(s, name).copy()) for name in STATE_ARRAYS} for s in run.states],
    }


def states_from_state(saved: list[dict], vocab_size: int, where: str) -> list[StreamState]:
    states = []
    for arrays in saved:
        state = StreamState.__new__(StreamState)
        for name in STATE_ARRAYS:
            setattr(state, name, np.ascontiguousarray(arrays[name].numpy()))
        check_stream_arrays(state.inputs, state.meta, state.hidden, state.errors, vocab_size, where)
        states.append(state)
    return states


def training_payload(trainer: Trainer, text: str, world_size: int, runs: list[dict] | None) -> dict:
    """The checkpoint of `trainer`; `runs` holds every process's run_to_state inside an epoch."""
    schedule = trainer.schedule
    return {
        "format": TRAINING_FORMAT,
        "version": VERSION,
        **model_payload(trainer.model),
        "epoch_start": None if trainer.run is None else weights_to_tensors(trainer.epoch_start),
        "schedule": {"epoch": schedule.epoch, "lr": schedule.lr, "halving": schedule.halving,
                     "finished": schedule.finished, "best": tally_to_state(schedule.best)},
        "history": [{"epoch": e.epoch, "lr": e.lr, "train": tally_to_state(e.train), "valid": tally_to_state(e.valid),
                     "kept": e.kept} for e in trainer.report.epochs],
        "seconds": trainer.report.seconds,
        "text": text,
        "layout": {"processes": world_size, "threads": trainer.threads},
        "runs": runs,
    }


RESUMABLE_WITH_OTHER = ("max_epochs", "dense_rate")  # the dense rate's default follows the number of ranks


def same_options(saved: dict, given: dict) -> bool:
    """A run may be resumed with another --max-epochs or --dense-rate; every other option must be the same."""
    def fixed(options: dict) -> dict:
        return {k: v for k, v in options.items() if k not in RESUMABLE_WITH_OTHER}
    return fixed(saved) == fixed(given)


def save_training(path: str | Path, payload: dict) -> None:
    write_atomic(path, payload)


def load_training(path: str | Path) -> dict:
    return read_checked(path, TRAINING_FORMAT)


def restore(trainer: Trainer, payload: dict, text: str, world_size: int, rank: int, where: str) -> None:
    """Put `trainer` where the checkpoint left off (this process's part of it)."""
    model = trainer.model
    if not same_options(payload["config"], model.config.to_state()) or payload["vocab"] != model.vocab.to_state():
        raise CheckpointError(f"{where}: taken with other model options (hidden size, classes, rates...) "
                              "or another vocabulary than this command's")
    if payload["text"] != text:
        raise CheckpointError(f"{where}: taken on another training text")
    cfg = model.config
    model.weights.assign(weights_from_tensors(payload["weights"], len(model.vocab), cfg.hidden,
                                              model.vocab.num_classes, where, cfg.direct_size))
    s = payload["schedule"]
    trainer.schedule.epoch, trainer.schedule.lr = s["epoch"], s["lr"]
    trainer.schedule.halving, trainer.schedule.finished = s["halving"], s["finished"]
    trainer.schedule.best = tally_from_state(s["best"])
    trainer.report.epochs = [EpochReport(e["epoch"], e["lr"], tally_from_state(e["train"]), tally_from_state(e["valid"]),
                                         e["kept"]) for e in payload["history"]]
    trainer.report.seconds = payload["seconds"]
    if payload["runs"] is None:
        return
    layout = payload["layout"]
    if layout != {"processes": world_size, "threads": trainer.threads}:
        raise CheckpointError(f"{where}: taken inside an epoch by {layout['processes']} process(es) × "
                              f"{layout['threads']} thread(s); resume it with the same")
    mine = payload["runs"][rank]
    trainer.start_epoch()
    trainer.epoch_start.assign(weights_from_tensors(payload["epoch_start"], len(model.vocab), cfg.hidden,
                                                    model.vocab.num_classes, where, cfg.direct_size))
    trainer.run = EpochRun(model, trainer.ids, trainer.run.rule, trainer.threads, position=mine["position"],
                           states=states_from_state(mine["states"], len(model.vocab), where), tally=tally_from_state(mine["tally"]))
