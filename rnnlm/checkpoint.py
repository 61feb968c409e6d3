"""Checkpoint files: written atomically, read without executing code.

A file is a torch-serialised dict of plain values and tensors, tagged with `format` and `version`.
Writing goes to a temporary file in the same directory, is fsynced, renamed over the target with
os.replace and the directory fsynced, so a crash leaves either the old file or the new one, never
a torn one. Reading uses `torch.load(weights_only=True)`: a pickle that tries to run code is refused.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from . import kernels
from .atomic import atomic_file
from .corpus import EOS
from .direct import DirectBlocks
from .evaluate import Tally
from .model import RNNLM, Config, StreamState, Weights, check_direct_size
from .vocab import CLASS_RULES, RARE, Vocabulary

MODEL_FORMAT = "rnnlm-model"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint: missing, corrupt, foreign, or from a newer version."""


def write_atomic(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, private=True) as f:
        torch.save(payload, f)


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


def weights_to_tensors(weights: Weights, copy: bool = False) -> dict[str, torch.Tensor]:
    """The weights as tensors sharing their memory, or (`copy`) holding a copy of it."""
    return {name: torch.from_numpy(array.copy() if copy else array) for name, array in weights.arrays().items()}


def weights_from_tensors(tensors: dict, vocab_size: int, hidden: int, classes: int, where: str,
                         direct_size: int = 0, base: Weights | None = None) -> Weights:
    """The weights a file holds, checked. With `base` (the model a daemon domain adapts), D may be
    saved as the domain's own blocks of the base's D (D_table, D_blocks) or as a full copy."""
    expected = {"U": (vocab_size, hidden), "W": (hidden, hidden), "V": (vocab_size, hidden), "X": (classes, hidden)}
    as_blocks = base is not None and direct_size and isinstance(tensors, dict) and "D_table" in tensors
    if direct_size and not as_blocks:
        expected["D"] = (direct_size,)
    elif not direct_size and isinstance(tensors, dict) and "D" in tensors:
        raise CheckpointError(f"{where}: direct weights D in a model configured without direct connections")
    arrays = {}
    for name, shape in expected.items():
        tensor = tensors.get(name) if isinstance(tensors, dict) else None
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise CheckpointError(f"{where}: weight {name} is missing or not float32 of shape {shape}")
        arrays[name] = np.ascontiguousarray(tensor.numpy())
    weights = Weights(**arrays)
    if not weights.all_finite():
        raise CheckpointError(f"{where}: weights contain NaN or infinity")
    if base is not None and direct_size:
        weights.D_own = _own_blocks(tensors, weights.D if not as_blocks else None, base.D, where)
        weights.D = base.D
    return weights


def _own_blocks(tensors: dict, full: np.ndarray | None, base: np.ndarray, where: str) -> DirectBlocks:
    """A domain's blocks of D: as saved, or those of a full copy that differ from the base's."""
    if full is not None:
        return DirectBlocks.differing(base, full)
    table, blocks = tensors.get("D_table"), tensors.get("D_blocks")
    if not isinstance(table, torch.Tensor) or not isinstance(blocks, torch.Tensor) or blocks.ndim != 2:
        raise CheckpointError(f"{where}: the domain's direct weights are not a block table and a matrix of blocks")
    own = DirectBlocks(np.ascontiguousarray(table.numpy()), np.ascontiguousarray(blocks.numpy()), blocks.shape[0])
    wrong = own.check(base.shape[0])
    if wrong:
        raise CheckpointError(f"{where}: {wrong}")
    return own


def model_payload(model: RNNLM) -> dict:
    return {
        "config": model.config.to_state(),
        "vocab": model.vocab.to_state(),
        "weights": weights_to_tensors(model.weights),
    }


def model_from_payload(payload: dict, where: str) -> RNNLM:
    """The model a file describes, once every invariant the compiled step relies on holds.

    This is the one check of a model, whether it comes from a model file, a daemon's state or its
    resume: the vocabulary's lists agree in length and hold what they must, the classes derived
    from the counts cover exactly the ids of the vocabulary and match X, every weight has its
    shape, dtype float32 and finite values. The step indexes the matrices unchecked, so anything
    less could crash the process on the first word of a bad class; here it is a CheckpointError."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where}: the model is not a map")
    try:
        config = Config.from_state(payload["config"])
        _check_vocab_state(payload["vocab"])
        vocab = Vocabulary.from_state(payload["vocab"])
    except CheckpointError as err:
        raise CheckpointError(f"{where}: damaged vocabulary ({err})") from None
    except Exception as err:  # any field of the wrong kind: a damaged file, never a crash
        raise CheckpointError(f"{where}: damaged model description ({type(err).__name__}: {err})") from None
    if isinstance(config.hidden, bool) or not isinstance(config.hidden, int) or not 1 <= config.hidden <= MAX_HIDDEN:
        raise CheckpointError(f"{where}: hidden size {config.hidden!r} is not an integer from 1 to {MAX_HIDDEN}")
    _check_classes(vocab, where)
    _check_direct(config, vocab, where)
    weights = weights_from_tensors(payload.get("weights"), len(vocab), config.hidden, vocab.num_classes, where,
                                   config.direct_size)
    return RNNLM(config, vocab, weights)


MAX_HIDDEN = 4096  # as `rnnlm train --hidden` allows
MAX_DIRECT_ORDER = 16  # as `rnnlm train --direct-order` allows


def _check_vocab_state(state) -> None:
    """The saved vocabulary's fields, before a Vocabulary is built from them."""
    if not isinstance(state, dict):
        raise CheckpointError("not a map")
    words, counts, rare = state.get("words"), state.get("counts"), state.get("rare_words")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        raise CheckpointError("'words' is not a list of non-empty strings")
    if len(set(words)) != len(words):
        raise CheckpointError("'words' holds a word twice")
    if RARE not in words or EOS not in words:
        raise CheckpointError(f"'words' lacks {RARE} or {EOS}")
    if not isinstance(counts, list) or len(counts) != len(words):
        raise CheckpointError(f"'counts' is not a list of one count per word ({len(words)})")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise CheckpointError("'counts' holds something other than non-negative integers")
    if not isinstance(rare, list) or not all(isinstance(w, str) for w in rare) or set(rare) & set(words):
        raise CheckpointError("'rare_words' is not a list of words outside the vocabulary")
    classes = state.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= len(words):
        raise CheckpointError(f"'num_classes' {classes!r} is not an integer from 1 to the vocabulary size {len(words)}")
    if state.get("class_rule", "frequency") not in CLASS_RULES:
        raise CheckpointError(f"'class_rule' {state.get('class_rule')!r} is not one of {', '.join(CLASS_RULES)}")


def _check_classes(vocab: Vocabulary, where: str) -> None:
    """Classes are contiguous id ranges that cover exactly the vocabulary's ids, in order."""
    v, c = len(vocab), vocab.num_classes
    start, end, of = vocab.class_start, vocab.class_end, vocab.class_of
    ok = (len(of) == v and len(start) == c and len(end) == c and c >= 1
          and start[0] == 0 and end[-1] == v and np.all(start < end) and np.all(start[1:] == end[:-1])
          and np.all((of >= 0) & (of < c)) and np.all(np.diff(of) >= 0))
    if not ok:
        raise CheckpointError(f"{where}: the word classes do not cover the vocabulary's {v} ids in {c} ranges")


def _check_direct(config: Config, vocab: Vocabulary, where: str) -> None:
    """Direct settings are finite non-negative numbers and the hash array's halves can hold their blocks.

    The step indexes D at a block start plus a class or word offset, unchecked: a size too small
    for the vocabulary would write outside the array."""
    def number(value) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    if not all(number(getattr(config, name)) for name in ("direct", "direct_l2", "direct_rate")):
        raise CheckpointError(f"{where}: direct settings are not finite non-negative numbers")
    if not number(config.dense_rate):
        raise CheckpointError(f"{where}: dense rate {config.dense_rate!r} is not a finite non-negative number")
    order = config.direct_order
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_DIRECT_ORDER:
        raise CheckpointError(f"{where}: direct order {order!r} is not an integer from 1 to {MAX_DIRECT_ORDER}")
    try:
        check_direct_size(config, vocab)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


# --- a stream's state and running totals, as the daemon's state file holds them ----------------

STREAM_STATE_DTYPES = {"hidden": torch.float32, "inputs": torch.int32, "errors": torch.float32, "meta": torch.int64}
TALLY_FIELDS = ("words", "oov", "rare", "loss_nats")


def stream_state_tensors(state: StreamState, copy: bool = False) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(getattr(state, k).copy() if copy else getattr(state, k)) for k in STREAM_STATE_DTYPES}


def stacked_stream_states(states: list[StreamState], empty: StreamState) -> dict[str, torch.Tensor]:
    """Streams' states, one tensor per field with a row per stream (always a copy): a few big
    tensors instead of four per stream, which would make a snapshot and its write take seconds.
    `empty` (a fresh state) gives the shapes when there are no streams."""
    if not states:
        return {k: torch.from_numpy(np.zeros((0, *getattr(empty, k).shape), dtype=getattr(empty, k).dtype))
                for k in STREAM_STATE_DTYPES}
    return {k: torch.from_numpy(np.stack([getattr(s, k) for s in states])) for k in STREAM_STATE_DTYPES}


def stream_state_rows(stacked, count: int, where: str) -> dict | None:
    """The stacked stream states of a file, checked to hold one row per stream (None: a file
    written before they were stacked keeps each stream's tensors in its own entry)."""
    if stacked is None:
        return None
    if not isinstance(stacked, dict) or not all(
            isinstance(stacked.get(k), torch.Tensor) and stacked[k].dim() >= 1 and stacked[k].shape[0] == count
            for k in STREAM_STATE_DTYPES):
        raise CheckpointError(f"{where}: the stream states are not tensors with one row per stream ({count})")
    return stacked


def stream_state_from_tensors(saved: dict, state: StreamState, vocab_size: int, where: str) -> StreamState:
    """`state` (a fresh one of the model) filled from saved tensors, checked: dtypes, shapes (the
    window), word ids, finite values."""
    for k, dtype in STREAM_STATE_DTYPES.items():
        tensor, target = saved[k], getattr(state, k)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != target.shape:
            raise CheckpointError(f"{where}: stream state '{k}' is not {dtype} of shape {target.shape} "
                                  "(or its window differs from this daemon's)")
        np.copyto(target, tensor.numpy())
    check_stream_arrays(state.inputs, state.meta, state.hidden, state.errors, vocab_size, where)
    return state


def check_stream_arrays(inputs: np.ndarray, meta: np.ndarray, hidden: np.ndarray, errors: np.ndarray,
                        vocab_size: int, where: str) -> None:
    """A saved stream state: word ids index the weight matrices unchecked in the compiled step."""
    window = hidden.shape[0] - 1
    ok = (np.all((inputs >= 0) & (inputs < vocab_size))
          and 0 <= meta[kernels.LAST_WORD] < vocab_size
          and 0 <= meta[kernels.PENDING] <= window and 0 <= meta[kernels.FILLED] <= window
          and np.isfinite(hidden).all() and np.isfinite(errors).all())
    if not ok:
        raise CheckpointError(f"{where}: a stream's state holds word ids outside the vocabulary or values out of range")


def tally_to_state(tally: Tally) -> dict:
    return {k: getattr(tally, k) for k in TALLY_FIELDS}


def tally_from_state(state: dict, where: str = "state", fields: tuple[str, ...] = TALLY_FIELDS) -> Tally:
    tally = Tally()
    for k in fields:
        value = state[k]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise CheckpointError(f"{where}: tally field {k} is not a finite non-negative number")
        setattr(tally, k, type(getattr(tally, k))(value))
    return tally


def save_model(model: RNNLM, path: str | Path) -> None:
    write_atomic(path, {"format": MODEL_FORMAT, "version": VERSION, **model_payload(model)})


def load_model(path: str | Path) -> RNNLM:
    return model_from_payload(read_checked(path, MODEL_FORMAT), str(path))
