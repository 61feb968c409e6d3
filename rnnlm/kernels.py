"""The network's arithmetic, compiled with numba: one word at a time, score then update.

    s(t) = sigmoid(U[w(t)] + W s(t-1))                      hidden layer, U[w] is a row lookup
    P(w | s) = P(c(w) | s) · P(w | c(w), s)                 frequency-class factorised output
    P(c | s) = softmax(X s)[c]                              class layer
    P(w | c, s) = softmax(V[c's rows] s)[w]                 words of the class only

With direct connections (RNNME, `Config.direct`), hashed n-gram features of the last 0..N-1
words add to the logits: X s + Σ_n D[class_base(n) + c] for the classes, and
V s + Σ_n D[word_base(n, c) + w - first word of c] for the words of class c. D is one float32
array; see `direct_bases` for the hashing. With D empty the step is exactly the plain network.
A daemon domain's D is the base's D plus copy-on-write blocks of its own (rnnlm/direct.py).

`sgd_pass` is the one learning loop of the project: training epochs, offline dynamic evaluation
and the daemon all call it. For every word it first computes ln P(word) with the current weights,
then (when learning) takes one SGD step on -ln P: the output weights right away, the recurrent and
input weights by truncated back-propagation through time every `block` words, reaching `bptt`
further steps back (the reference toolkit's -bptt / -bptt-block; bptt=0, block=1 is plain
backpropagation, τ=1).

Gradients are derived by hand (checked against torch autograd in tests/test_kernels.py); loops
over contiguous rows let LLVM vectorise them. Weights are float32; log-probabilities float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

ERROR_CUTOFF = 15.0  # the toolkit's gradient cut-off on hidden-layer errors
ACTIVATION_LIMIT = 50.0  # keeps exp() finite; sigmoid(±50) is 0 or 1 in float32 anyway

# Fast-math without the no-NaN/no-infinity assumptions, so the finiteness check below is honoured.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
jit = njit(cache=True, fastmath=FASTMATH, nogil=True, boundscheck=False)

# meta[] slots of a stream's state
LAST_WORD, PENDING, FILLED = 0, 1, 2

# Weights per block of a daemon domain's copy-on-write D (rnnlm/direct.py). Defined here, where it is
# compiled in: numba's cache of this file would keep a value defined elsewhere after it changed.
BLOCK = 256

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: spreads the class over the word hash


@jit
def mix64(x):
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@jit
def history_hash(inputs, K, n):
    """Hash of the n most recent words, inputs[K] (the last word) back to inputs[K-n+1]; n=0 is the empty history."""
    h = mix64(np.uint64(n + 1))
    for b in range(n):
        h = mix64(h ^ np.uint64(inputs[K - b] + 1))
    return h


@jit
def direct_bases(size, order, inputs, K, c, classes, span, class_bases, word_bases):
    """Where the features of histories of 0..order-1 words start in D, for the classes and for class c's words.

    D is split in two halves: the class features (touched at every word, C weights per history)
    and the word features (a class's words per history and class) never collide with each other.
    A block of C (or class-size) consecutive weights per history keeps the loops contiguous;
    the hash picks the block's start so that it fits without wrapping.
    """
    half = size // 2
    for n in range(order):
        h = history_hash(inputs, K, n)
        class_bases[n] = np.int64(h % np.uint64(half - classes + 1))
        word_bases[n] = half + np.int64(mix64(h ^ (np.uint64(c + 1) * GOLDEN)) % np.uint64(half - span + 1))


@jit
def hidden_step(U, W, word, s_prev, s):
    """s = sigmoid(U[word] + W s_prev)"""
    H = s.shape[0]
    for j in range(H):
        a = U[word, j]
        for i in range(H):
            a += W[j, i] * s_prev[i]
        a = min(max(a, -ACTIVATION_LIMIT), ACTIVATION_LIMIT)
        s[j] = 1.0 / (1.0 + math.exp(-a))


@jit
def direct_weight(D, table, pool, i):
    """Weight i of the direct array: D's own, or (a domain's copy: `table` non-empty) its copied block's."""
    if table.shape[0] > 0:
        slot = table[i // BLOCK]
        if slot >= 0:
            return pool[slot, i % BLOCK]
    return D[i]


@jit
def own_blocks(D, table, pool, used, start, count):
    """Give the domain its own copy of every block that weights start..start+count-1 of D fall in.

    A block not yet its own is copied from the base's D into the next free row of the pool, which
    the caller has made room for (direct.DirectBlocks.reserve); the base's D is only read."""
    for block in range(start // BLOCK, (start + count - 1) // BLOCK + 1):
        if table[block] >= 0:
            continue
        slot = used[0]
        used[0] += 1
        lo = block * BLOCK
        n = min(BLOCK, D.shape[0] - lo)
        for j in range(n):
            pool[slot, j] = D[lo + j]
        for j in range(n, BLOCK):
            pool[slot, j] = 0.0
        table[block] = slot


@jit
def softmax_rows(M, lo, hi, s, target, p, D, table, pool, bases, features):
    """p[k-lo] = softmax over rows lo..hi-1 of (M s + direct features); returns ln p[target-lo], computed stably.

    The direct features of row k are D[bases[n] + k - lo] for n < features (see `direct_weight`).
    """
    H = s.shape[0]
    top = -np.inf
    z_target = 0.0
    for k in range(lo, hi):
        z = 0.0
        for j in range(H):
            z += M[k, j] * s[j]
        for n in range(features):
            z += direct_weight(D, table, pool, bases[n] + k - lo)
        p[k - lo] = z
        top = max(top, z)
        if k == target:
            z_target = z
    total = 0.0
    for i in range(hi - lo):
        e = math.exp(p[i] - top)
        p[i] = e
        total += e
    for i in range(hi - lo):
        p[i] /= total
    return (z_target - top) - math.log(total)


@jit
def softmax_rows_backward(M, lo, hi, s, target, p, lr, beta, ds, D, table, pool, used, bases, features,
                          d_lr, d_beta):
    """One SGD step on -ln p[target] for rows lo..hi-1 of M and their direct features, adding dlnP/ds to `ds`.

    d ln p[target] / d z_k = [k == target] - p_k, so row k moves by lr·g_k·s and each of its
    direct weights by d_lr·g_k (L2 d_beta on the weights touched); `ds` is taken from the weights
    before they move. A domain's copy (`table` non-empty) writes its own blocks, never D.
    """
    H = s.shape[0]
    cow = table.shape[0] > 0
    if cow:
        for n in range(features):
            own_blocks(D, table, pool, used, bases[n], hi - lo)
    for k in range(lo, hi):
        g = -p[k - lo]
        if k == target:
            g += 1.0
        for n in range(features):
            i = bases[n] + k - lo
            if cow:
                slot = table[i // BLOCK]
                d = pool[slot, i % BLOCK]
                pool[slot, i % BLOCK] = d + d_lr * (g - d_beta * d)
            else:
                d = D[i]
                D[i] = d + d_lr * (g - d_beta * d)
        for j in range(H):
            m = M[k, j]
            ds[j] += g * m
            M[k, j] = m + lr * (g * s[j] - beta * m)


@jit
def backprop_through_time(U, W, hidden, inputs, errors, steps, lr, dense_lr, beta, dz):
    """Propagate the errors waiting in the window back `steps` steps, then update W (at dense_lr) and U (at lr).

    Window slot k holds s(k) and the word that was its input; errors[k] is d ln P / d s(k).
    W's gradient is Σ_k dz(k) ⊗ s(k-1); it is applied once at the end, row by row, because the
    errors must travel back through the W that produced the states.
    """
    K = hidden.shape[0] - 1
    H = W.shape[0]
    lowest = K - steps + 1
    for k in range(K, lowest - 1, -1):
        for j in range(H):
            e = min(max(errors[k, j], -ERROR_CUTOFF), ERROR_CUTOFF)
            dz[k, j] = e * hidden[k, j] * (1.0 - hidden[k, j])  # sigmoid' = s(1-s)
            errors[k, j] = 0.0
        word = inputs[k]
        for j in range(H):
            U[word, j] += lr * dz[k, j]
        if k > lowest:
            for j in range(H):
                g = dz[k, j]
                for i in range(H):
                    errors[k - 1, i] += g * W[j, i]
    decay = 1.0 - dense_lr * beta
    for j in range(H):
        if beta > 0.0:
            for i in range(H):
                W[j, i] *= decay
        for k in range(lowest, K + 1):
            g = dense_lr * dz[k, j]
            for i in range(H):
                W[j, i] += g * hidden[k - 1, i]


@jit
def slide_window(hidden, inputs, errors):
    K = hidden.shape[0] - 1
    for k in range(K):
        hidden[k, :] = hidden[k + 1, :]
        errors[k, :] = errors[k + 1, :]
        inputs[k] = inputs[k + 1]
    errors[K, :] = 0.0


@jit
def sgd_pass(U, W, V, X, D, D_table, D_pool, D_used, class_of, class_start, class_end,
             hidden, inputs, errors, meta,
             targets, lr, dense_lr, beta, d_lr, d_beta, order, bptt, block, learn, out_logp):
    """Score each target with the current weights (ln P into out_logp), then learn from it.

    hidden/inputs/errors/meta are one stream's state (see model.StreamState); they carry the
    context from one call to the next, so a text may be fed in pieces of any size. The direct
    features (D non-empty) read their history, up to order-1 words, from the window's inputs.
    A domain's copy of D passes the base's D with its block table, pool and pool counter
    (rnnlm/direct.py); a model's own D passes an empty table and is read and written in place.
    Returns how many words were learned from; a word whose ln P is not finite is not.
    The dense layers, W and the class layer X, learn at dense_lr; U and V at lr.
    """
    K = hidden.shape[0] - 1
    H = W.shape[0]
    C = X.shape[0]
    span = int(np.max(class_end - class_start))
    p_class = np.empty(C, dtype=np.float32)
    p_word = np.empty(span, dtype=np.float32)
    features = order if D.shape[0] > 0 else 0
    class_bases = np.zeros(max(features, 1), dtype=np.int64)
    word_bases = np.zeros(max(features, 1), dtype=np.int64)
    ds = np.empty(H, dtype=np.float32)
    dz = np.empty((K + 1, H), dtype=np.float32)
    learned = 0
    for t in range(targets.shape[0]):
        target = targets[t]
        slide_window(hidden, inputs, errors)
        word = meta[LAST_WORD]
        inputs[K] = word
        hidden_step(U, W, word, hidden[K - 1], hidden[K])
        s = hidden[K]
        c = class_of[target]
        lo, hi = class_start[c], class_end[c]
        if features:
            direct_bases(D.shape[0], features, inputs, K, c, C, span, class_bases, word_bases)
        out_logp[t] = (softmax_rows(X, 0, C, s, c, p_class, D, D_table, D_pool, class_bases, features)
                       + softmax_rows(V, lo, hi, s, target, p_word, D, D_table, D_pool, word_bases, features))
        meta[FILLED] = min(meta[FILLED] + 1, K)
        meta[LAST_WORD] = target
        if not learn or not math.isfinite(out_logp[t]):
            continue
        learned += 1
        ds[:] = 0.0
        softmax_rows_backward(X, 0, C, s, c, p_class, dense_lr, beta, ds, D, D_table, D_pool, D_used, class_bases,
                              features, d_lr, d_beta)
        softmax_rows_backward(V, lo, hi, s, target, p_word, lr, beta, ds, D, D_table, D_pool, D_used, word_bases,
                              features, d_lr, d_beta)
        for j in range(H):
            errors[K, j] += ds[j]
        meta[PENDING] += 1
        if meta[PENDING] >= block:
            steps = min(bptt + meta[PENDING], meta[FILLED])
            backprop_through_time(U, W, hidden, inputs, errors, steps, lr, dense_lr, beta, dz)
            meta[PENDING] = 0
    return learned
