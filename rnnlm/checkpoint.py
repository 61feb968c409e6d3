"""Checkpoint files: written atomically, read without executing code.

A file is a torch-serialised dict of plain values and tensors, tagged with `format` and `version`.
Writing goes to a temporary file in the same directory, is fsynced, renamed over the target with
os.replace and the directory fsynced, so a crash leaves either the old file or the new one, never
a torn one. Reading uses `torch.load(weights_only=True)`: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import os
import tempfile
import warnings
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
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged or hostile file
        raise load_failure(path, str(err).strip() or type(err).__name__, expected_format) from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise CheckpointError(f"{path}: not an {expected_format} file")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: {expected_format} version {payload.get('version')} is not supported (expected {VERSION})")
    return payload


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
PICKLE_PROTO = b"\x80"  # ...or, in its legacy format, starts with a pickle protocol opcode


def load_failure(path: Path, text: str, expected_format: str) -> CheckpointError:
    """Why torch could not load `path`, in words that fit: a pickle that names a callable or class
    beyond torch's own holds code and is called so; anything else is a wrong or damaged file, said calmly."""
    code = foreign_global(path)
    if code:
        return CheckpointError(f"{path}: refused: it holds code or objects a checkpoint never has, which loading "
                               f"would run or build (GLOBAL {code})")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        return CheckpointError(f"{path}: not an {expected_format} file (not a file torch.save writes at all: "
                               "a text file, or some other format?)")
    reason = next((line.strip() for line in text.splitlines() if line.strip()), text)
    if reason.startswith("Weights only load failed"):  # torch's advice to turn the protection off is no reason
        reason = next((line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")), "")
    return CheckpointError(f"{path}: not an {expected_format} file, or a damaged one (torch cannot read it"
                           f"{': ' + reason.split('. ')[0][:160] if reason else ''})")


def foreign_global(path: Path) -> str | None:
    """The first callable or class the file's pickle names that is not torch's own, if any.

    Only reads the opcodes (pickletools), never runs them; a torch.save zip holds its pickle as
    `<name>/data.pkl`, the legacy format is a pickle from the first byte."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                continue
            if not (module == "torch" or module.startswith("torch.") or (module, name) == ("collections", "OrderedDict")):
                return f"{module}.{name}"
    except Exception:  # a damaged pickle: what was read before the damage has been checked
        return None
    return None


def weights_to_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in weights.arrays().items()}


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
