"""Checkpoint files: written atomically, read without executing code.

A file is a torch-serialised dict of plain values and tensors, tagged with `format` and `version`.
Writing goes to a temporary file in the same directory, is fsynced, renamed over the target with
os.replace and the directory fsynced, so a crash leaves either the old file or the new one, never
a torn one. Reading uses `torch.load(weights_only=True)`: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .model import RNNLM, Config, Weights
from .vocab import Vocabulary

MODEL_FORMAT = "rnnlm-model"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint: missing, corrupt, foreign, or from a newer version."""


def write_atomic(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checked(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or hostile file
        text = str(err).strip()
        if text.startswith("Weights only load failed"):
            # torch's first line suggests weights_only=False; the reason is further down.
            detail = next((line.strip() for line in text.splitlines()
                           if "GLOBAL" in line or "Unsupported" in line), "objects other than tensors and plain values")
            raise CheckpointError(f"{path}: refused: it holds code or objects a checkpoint never has, which loading "
                                  f"would run or build ({detail[:200]})") from None
        reason = text.splitlines()[0] if text else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise CheckpointError(f"{path}: not an {expected_format} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: {expected_format} version {payload.get('version')} is not supported (expected {VERSION})")
    return payload


def weights_to_tensors(weights: Weights, copy: bool = False) -> dict[str, torch.Tensor]:
    """The weights as tensors sharing their memory, or (`copy`) holding a copy of it."""
    return {name: torch.from_numpy(array.copy() if copy else array) for name, array in weights.arrays().items()}


def weights_from_tensors(tensors: dict, vocab_size: int, hidden: int, classes: int, where: str) -> Weights:
    expected = {"U": (vocab_size, hidden), "W": (hidden, hidden), "V": (vocab_size, hidden), "X": (classes, hidden)}
    arrays = {}
    for name, shape in expected.items():
        tensor = tensors.get(name) if isinstance(tensors, dict) else None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise CheckpointError(f"{where}: weight {name} is missing or not float32 of shape {shape}")
        arrays[name] = np.ascontiguousarray(tensor.numpy())
    weights = Weights(**arrays)
    if not weights.all_finite():
        raise CheckpointError(f"{where}: weights contain NaN or infinity")
    return weights


def model_payload(model: RNNLM) -> dict:
    return {
        "config": model.config.to_state(),
        "vocab": model.vocab.to_state(),
        "weights": weights_to_tensors(model.weights),
    }


def model_from_payload(payload: dict, where: str) -> RNNLM:
    try:
        config = Config.from_state(payload["config"])
        vocab = Vocabulary.from_state(payload["vocab"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: damaged model description ({err})") from None
    weights = weights_from_tensors(payload.get("weights"), len(vocab), config.hidden, vocab.num_classes, where)
    return RNNLM(config, vocab, weights)


def save_model(model: RNNLM, path: str | Path) -> None:
    write_atomic(path, {"format": MODEL_FORMAT, "version": VERSION, **model_payload(model)})


def load_model(path: str | Path) -> RNNLM:
    return model_from_payload(read_checked(path, MODEL_FORMAT), str(path))
