"""A domain's direct weights (RNNME) as copy-on-write blocks of the base model's hash array D.

The daemon adapts one copy of the model per domain. D is large (10 M weights are 40 MB, 100 M are
400 MB) but a domain writes only the few blocks its n-gram histories hash to, so a domain keeps:

    table[b]  which row of `pool` holds its own copy of block b of D (-1: it still reads the base's)
    pool      its copied blocks, BLOCK weights each, in the order they were first written

The compiled step (`kernels.sgd_pass`) reads a weight from the domain's block when it has one and
from the base's D otherwise, and copies a block into the pool the first time it writes to it; the
base's D is never written. A domain thus costs 4 bytes per block of D for its table plus its copied
blocks, whatever the size of D. The pool grows here, in Python, before each call of the step: by
at most the blocks that the call's words can touch (`blocks_per_word`).
"""

from __future__ import annotations

import numpy as np

from .kernels import BLOCK  # weights per block: the fewer, the less a word's features copy; the more, the smaller the table
OWN_NOTHING = -1
MAX_WORDS_PER_CALL = 512  # bounds how far one call of the step grows the pool ahead of its need


def block_count(size: int) -> int:
    return -(-size // BLOCK)


def blocks_per_word(order: int, classes: int, span: int) -> int:
    """Most blocks one learned word can write: each of its `order` features writes `classes` weights
    for the class layer and at most `span` (the largest class) for the target's class."""
    def most_blocks(run: int) -> int:  # a run of consecutive weights starting anywhere in a block
        return (run - 1) // BLOCK + 2
    return order * (most_blocks(classes) + most_blocks(span))


class DirectBlocks:
    """One domain's copied blocks of D (see the module's docstring); `used` is the step's counter."""

    def __init__(self, table: np.ndarray, pool: np.ndarray, used: int):
        self.table = table  # int32 (blocks of D,)
        self.pool = pool  # float32 (capacity, BLOCK); rows below `used` are in use
        self.used = np.array([used], dtype=np.int64)

    @classmethod
    def empty(cls, size: int) -> "DirectBlocks":
        """Nothing copied yet: every weight is read from the base."""
        return cls(np.full(block_count(size), OWN_NOTHING, dtype=np.int32), np.zeros((0, BLOCK), dtype=np.float32), 0)

    @classmethod
    def differing(cls, base: np.ndarray, full: np.ndarray) -> "DirectBlocks":
        """The blocks of a full copy `full` of D that differ from `base` (a state saved as a full copy)."""
        size = base.shape[0]
        padded = np.zeros((2, block_count(size) * BLOCK), dtype=np.float32)
        padded[0, :size], padded[1, :size] = base, full
        rows = padded.reshape(2, -1, BLOCK)
        changed = np.flatnonzero((rows[0] != rows[1]).any(axis=1))
        table = np.full(rows.shape[1], OWN_NOTHING, dtype=np.int32)
        table[changed] = np.arange(changed.size, dtype=np.int32)
        return cls(table, np.ascontiguousarray(rows[1][changed]), changed.size)

    @property
    def count(self) -> int:
        return int(self.used[0])

    @property
    def blocks(self) -> np.ndarray:
        """The copied blocks (a view of the pool's rows in use)."""
        return self.pool[: self.count]

    @property
    def nbytes(self) -> int:
        """What this domain's D costs beyond the base's: its table and its copied blocks."""
        return self.table.nbytes + self.blocks.nbytes

    def reserve(self, blocks: int) -> None:
        """Make room for `blocks` more copied blocks (never more than D has), so the step never runs out."""
        need = min(self.count + blocks, self.table.shape[0])
        if need <= self.pool.shape[0]:
            return
        pool = np.empty((max(need, min(2 * self.pool.shape[0], self.table.shape[0])), BLOCK), dtype=np.float32)
        pool[: self.count] = self.blocks
        self.pool = pool

    def copy(self) -> "DirectBlocks":
        return DirectBlocks(self.table.copy(), self.blocks.copy(), self.count)

    def assign(self, other: "DirectBlocks | None") -> None:
        """Become a copy of `other` (None: nothing copied, the base itself), keeping this object."""
        if other is None:
            self.table.fill(OWN_NOTHING)
            self.used[0] = 0
            return
        np.copyto(self.table, other.table)
        self.used[0] = 0
        self.reserve(other.count)
        self.pool[: other.count] = other.blocks
        self.used[0] = other.count

    def decay(self, keep: np.float32, scaled_base: np.ndarray) -> None:
        """w ← keep·w + λ·w_base on the copied blocks (the others are the base's: decay leaves them so)."""
        owned = np.flatnonzero(self.table >= 0)
        for b in owned:  # block by block: the last block of D may be short
            row = self.pool[self.table[b]]
            lo, hi = b * BLOCK, min((b + 1) * BLOCK, scaled_base.shape[0])
            row *= keep
            row[: hi - lo] += scaled_base[lo:hi]

    def check(self, size: int) -> str | None:
        """Why this table and these blocks cannot be a domain's copy of a D of `size` weights, if they cannot."""
        if self.table.dtype != np.int32 or self.table.shape != (block_count(size),):
            return f"the block table is not int32 of shape ({block_count(size)},)"
        if self.pool.dtype != np.float32 or self.pool.ndim != 2 or self.pool.shape[1] != BLOCK:
            return f"the copied blocks are not float32 rows of {BLOCK}"
        slots = self.table[self.table != OWN_NOTHING]
        if ((slots < 0) | (slots >= self.count)).any() or np.unique(slots).size != slots.size or slots.size != self.count:
            return "the block table does not name each copied block exactly once"
        if not np.isfinite(self.blocks).all():
            return "the copied blocks contain NaN or infinity"
        return None


# What the step is given for a model's own D (training, `eval --dynamic`): no table, write in place.
NO_TABLE = np.zeros(0, dtype=np.int32)
NO_POOL = np.zeros((0, BLOCK), dtype=np.float32)
NO_USED = np.zeros(1, dtype=np.int64)
