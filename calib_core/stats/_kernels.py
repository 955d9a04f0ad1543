"""numba kernels for the hot paths: byte swapping, per-pixel stack statistics, and the per-step
kernels at the end of this file (the fringe scale fit of ISR, the satellite-trail search of the sky
build's barrier, the fringe continuum removal's per-input sums), each tested against the NumPy
formulation it replaced (tests/test_isr.py, tests/test_streaks.py, tests/test_fringe.py).

The per-pixel statistics here must agree with the NumPy reference in :mod:`calib_core.stats.clipped`
(tests/test_stack.py checks it). Differences from the reference are only in float64 rounding:
sums are accumulated about a centre (shifted sums) instead of with a separate mean pass.

MEANCLIP (:func:`meanclip_blocks`) works on blocks of adjacent pixels with a sorting network and
branchless clip passes, vectorised across the pixels of a block (see the comment above it).
MEAN, MEDIAN and MINMAX (:func:`stack_kernel`) work pixel by pixel; the median uses in-place
selection (Hoare partition quickselect, :func:`_select`, also used by :mod:`calib_core.stats.binned`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from calib_core.stats.clipped import IQR_TO_SIGMA  # the one definition (numba reads it as a constant)

__all__ = ["bswap32_inplace", "stack_kernel", "meanclip_blocks", "sorting_network", "sorting_program",
           "block_width", "STACK_CODES", "bridge_rows", "subtract_level", "calibrate_pixels"]

#: statistics with a numba kernel: MEANCLIP -> :func:`meanclip_blocks`, the others -> :func:`stack_kernel`
STACK_CODES = {"MEAN": 0, "MEANCLIP": 1, "MEDIAN": 2, "MINMAX": 3}



@njit(cache=True, nogil=True)
def bswap32_inplace(a):
    """Swap the bytes of every element of a 1-D uint32 array, in place.

    Serial on purpose: it runs on a band just read (hot in cache), where a parallel launch per
    band costs more than the swap, badly so when the cores are shared.
    """
    for i in range(a.size):
        v = a[i]
        a[i] = (((v & np.uint32(0x000000FF)) << np.uint32(24)) | ((v & np.uint32(0x0000FF00)) << np.uint32(8))
                | ((v & np.uint32(0x00FF0000)) >> np.uint32(8)) | ((v >> np.uint32(24)) & np.uint32(0xFF)))


@njit(cache=True, nogil=True, inline="always")
def _lerp(a, b, t):
    """numpy's linear interpolation (numpy.lib._function_base_impl._lerp), bit for bit."""
    d = b - a
    if t >= 0.5:
        return b - d * (1.0 - t)
    return a + d * t


@njit(cache=True, nogil=True, inline="always")
def _select(a, lo, hi, k):
    """Rearrange a[lo:hi] so that a[k] holds the value of rank k (0-based, within the whole array),
    everything before it in [lo, k) is <= a[k] and everything in (k, hi) is >= a[k]."""
    hi = hi - 1
    while hi > lo:
        if hi - lo < 16:
            # insertion sort for short ranges
            for i in range(lo + 1, hi + 1):
                v = a[i]
                j = i - 1
                while j >= lo and a[j] > v:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = v
            return
        mid = (lo + hi) // 2
        # median of three pivot
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


@njit(cache=True, nogil=True, inline="always")
def _min_range(a, lo, hi):
    m = a[lo]
    for i in range(lo + 1, hi):
        if a[i] < m:
            m = a[i]
    return m


@njit(cache=True, nogil=True)
def _median(s, n):
    p = 0.5 * (n - 1)
    k2 = int(math.floor(p))
    f2 = p - k2
    _select(s, 0, n, k2)
    m_lo = s[k2]
    if f2 > 0:
        m_hi = _min_range(s, k2 + 1, n)
        return _lerp(m_lo, m_hi, f2)
    return m_lo


@njit(parallel=True, cache=True, nogil=True)
def stack_kernel(data, masks, has_mask, variances, use_var, inv_scale, ignore_bits, stat,
                 nlow, nhigh, no_data_bit, out_value, out_var, out_mask, out_n):
    """Per-pixel statistic across ``data`` (N, R, nx) float32 into the (R, nx) outputs.

    ``masks`` (int32) and ``variances`` (float32) have the shape of ``data`` when ``has_mask`` /
    ``use_var`` are true (pass any 3-D array of that dtype otherwise). Input i is multiplied by
    ``inv_scale[i]`` (variance by its square) after admission. ``stat`` is the :data:`STACK_CODES`
    value of MEAN, MEDIAN or MINMAX (MEANCLIP has its own kernel, :func:`meanclip_blocks`).
    Output variance: from the inputs' variances (sum over used / n**2) when ``use_var``, else
    error**2 from the spread.
    """
    N, R, nx = data.shape
    npix = R * nx
    chunk = 256
    nchunks = (npix + chunk - 1) // chunk
    for c in prange(nchunks):
        buf = np.empty(N, np.float64)
        vbuf = np.empty(N, np.float64)
        s = np.empty(N, np.float64)
        p0 = c * chunk
        p1 = min(npix, p0 + chunk)
        for p in range(p0, p1):
            r = p // nx
            x = p - r * nx
            n = 0
            om = 0
            for i in range(N):
                v = data[i, r, x]
                if not math.isfinite(v):
                    continue
                if has_mask:
                    m = masks[i, r, x]
                    if (m & ignore_bits) != 0:
                        continue
                    om |= m
                sc = inv_scale[i]
                buf[n] = v * sc
                if use_var:
                    vbuf[n] = variances[i, r, x] * sc * sc
                n += 1
            if n == 0:
                out_value[r, x] = np.nan
                out_var[r, x] = np.nan
                out_mask[r, x] = no_data_bit
                out_n[r, x] = 0
                continue
            out_mask[r, x] = om
            mean = np.nan
            var = np.nan
            nu = 0
            vsum = 0.0
            if stat == 0:  # MEAN
                acc = 0.0
                for j in range(n):
                    acc += buf[j]
                mean = acc / n
                ss = 0.0
                for j in range(n):
                    d = buf[j] - mean
                    ss += d * d
                    if use_var:
                        vsum += vbuf[j]
                nu = n
                var = ss / (n - 1) if n > 1 else np.nan
            elif stat == 2:  # MEDIAN
                for j in range(n):
                    s[j] = buf[j]
                mean = _median(s, n)
                acc = 0.0
                for j in range(n):
                    acc += buf[j]
                    if use_var:
                        vsum += vbuf[j]
                mu = acc / n
                ss = 0.0
                for j in range(n):
                    d = buf[j] - mu
                    ss += d * d
                var = (ss / (n - 1)) * (math.pi / 2) if n > 1 else np.nan
                if use_var:
                    vsum *= math.pi / 2
                nu = n
            else:  # MINMAX: drop nlow lowest, nhigh highest (ties broken by input order)
                # stable insertion sort of indices by value
                idx = np.empty(n, np.int64)
                for j in range(n):
                    idx[j] = j
                for j in range(1, n):
                    t = idx[j]
                    v = buf[t]
                    q = j - 1
                    while q >= 0 and buf[idx[q]] > v:
                        idx[q + 1] = idx[q]
                        q -= 1
                    idx[q + 1] = t
                lo = nlow
                hi = n - nhigh
                if hi > lo:
                    acc = 0.0
                    for j in range(lo, hi):
                        acc += buf[idx[j]]
                        if use_var:
                            vsum += vbuf[idx[j]]
                    nu = hi - lo
                    mean = acc / nu
                    ss = 0.0
                    for j in range(lo, hi):
                        d = buf[idx[j]] - mean
                        ss += d * d
                    var = ss / (nu - 1) if nu > 1 else np.nan
                else:
                    nu = 0
            out_value[r, x] = mean
            out_n[r, x] = nu
            if nu == 0:
                out_var[r, x] = np.nan
            elif use_var:
                out_var[r, x] = vsum / (nu * nu)
            else:
                out_var[r, x] = var / nu


# ---------------------------------------------------------------------------------------------------
# MEANCLIP hot path: blocks of pixels, sorting network, branchless clip passes.
#
# A block is W adjacent pixels of one row, held as s[N, W] (input i of pixel j at s[i, j]), so every
# step is a loop over W contiguous float32/float64 lanes that LLVM vectorises (no per-pixel branches):
#   1. gather: non-admitted values (NaN/inf, masked) -> +inf, which sort to the end; count per pixel;
#   2. sort each column with a fixed comparator network (Batcher's odd-even merge sort for N keys):
#      a comparator (a, b) is s[a, :], s[b, :] = min, max over the W lanes; groups of comparators on
#      8 or 16 rows run in registers (:func:`sorting_program`);
#   3. Q1/median/Q3 per pixel: numpy 'linear' percentiles at the pixel's own count (row-wise when
#      every pixel of the block has the same count);
#   4. each clip pass: masked sums of d = x - centre over the rows where |d| <= width (the exact
#      predicate of the reference, in float64), so the kept set is the reference's set; then
#      mean = centre + sum(d) / k, var = (sum(d*d) - sum(d)**2 / k) / (k - 1). On sorted values the
#      kept rows are contiguous: the middle rows, kept by every pixel of the block in the usual case,
#      are summed once about the median and re-centred each pass, so a pass scans only the outer rows.
# Sums about a centre (shifted sums) instead of a separate mean pass: the results differ from the
# NumPy reference only by float64 rounding (on the test data the float32 outputs are identical).
# ---------------------------------------------------------------------------------------------------


def _batcher_stages(p2: int):
    """Batcher's odd-even merge sort for p2 (a power of two) keys, stage by stage:
    [(p, k, [(a, b), ...]), ...] in network order; comparator (a, b), a < b, puts the minimum in a."""
    stages = []
    p = 1
    while p < p2:
        k = p
        while k >= 1:
            comps = []
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p):
                        comps.append((a, b))
            stages.append((p, k, comps))
            k //= 2
        p *= 2
    return stages


def sorting_network(n: int) -> np.ndarray:
    """Comparators of Batcher's odd-even merge sort for ``n`` keys, as an int64 array (C, 2) of
    (a, b) with a < b: after ``x[a], x[b] = min, max`` for every row in order, x is ascending.

    Built for the next power of two and pruned: a key at index >= n acts as +inf, so a comparator
    that touches one never moves anything.
    """
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    p2 = 1 << (int(n) - 1).bit_length()
    comps = [c for _, _, cs in _batcher_stages(p2) for c in cs if c[1] < n]
    return np.array(comps, np.int64).reshape(-1, 2)


# costs (memory operations + 2 per min/max pair, per vector of lanes) used to choose between a fused
# group and its comparators one by one
_COST_CMP, _COST_SORT8, _COST_MERGE16 = 4 + 2, 16 + 2 * 19, 32 + 2 * 25


def sorting_program(n: int) -> tuple[np.ndarray, int]:
    """The network of :func:`sorting_network` (n) as a program for :func:`_sort_columns`.

    Returns ``(ops, rows)``: ``ops`` (M, 3) int64, each op one of
    ``(0, a, b)`` compare-exchange rows a < b; ``(1, base, 1)`` sort rows base..base+7 in registers
    (Batcher's levels p = 1, 2, 4 on that block); ``(2, base, step)`` merge the two sorted halves of
    rows base + m*step, m < 16, in registers. Level p >= 8 of Batcher's network only compares rows
    a distance >= p/8 apart in its first four stages, so those stages split into independent
    16-row merges of the rows of one residue mod p/8 (the same comparators, grouped); its last
    stages stay single comparators. A group costs two memory operations per row instead of four
    per comparator, and is used where it is cheaper. ``rows`` (>= n): rows the scratch needs;
    rows >= n must hold +inf (a comparator never moves a finite value into them).
    """
    ops, rows = _program(int(n))
    return ops.copy(), rows


@functools.lru_cache(maxsize=64)
def _program(n: int):
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    p2 = 1 << (n - 1).bit_length()
    stages = _batcher_stages(p2)
    ops = []
    rows = n

    def singles(comps):
        ops.extend((0, a, b) for a, b in comps if b < n)

    small = [c for p, _, cs in stages if p < 8 for c in cs]
    if p2 >= 8:
        for b0 in range(0, p2, 8):
            cs = [(a, b) for a, b in small if b0 <= a < b0 + 8 and b < n]
            if _COST_CMP * len(cs) > _COST_SORT8:
                ops.append((1, b0, 1))
                rows = max(rows, b0 + 8)
            else:
                singles(cs)
    else:
        singles(small)
    p = 8
    while p < p2:
        level = [(k, cs) for pp, k, cs in stages if pp == p]
        d = p // 8
        first = [c for k, cs in level if k >= d for c in cs]
        for b0 in range(0, p2, 2 * p):
            for i in range(d):
                cs = [(a, b) for a, b in first if b0 <= a < b0 + 2 * p and (a - b0) % d == i and b < n]
                if _COST_CMP * len(cs) > _COST_MERGE16:
                    ops.append((2, b0 + i, d))
                    rows = max(rows, b0 + i + 15 * d + 1)
                else:
                    singles(cs)
        for k, cs in level:
            if k < d:
                singles(cs)
        p *= 2
    out = np.array(ops, np.int64).reshape(-1, 3)
    out.flags.writeable = False
    return out, rows


def block_width(n: int) -> int:
    """Pixels per block: 256 (32 vectors of 8 float32; shorter loops pay their set-up, longer blocks
    leave L1), fewer for very large n so the block stays within ~1 MB (L2)."""
    return int(min(256, max(64, (1 << 20) // (4 * max(1, n)) // 16 * 16)))


#: extra float32 per row of the sorting scratch: a row stride of a power of two bytes would put the
#: rows of a strided merge group (rows base + m * step) in the same L1 cache set
ROW_PAD = 16


@njit(cache=True, nogil=True, inline="always")
def _mn(x, y):
    return x if x < y else y


@njit(cache=True, nogil=True, inline="always")
def _mx(x, y):
    return y if x < y else x


@njit(cache=True, nogil=True)
def _sort8(s, base, w):
    """Sort rows base..base+7 of s (columns < w) in registers: Batcher's 19-comparator network."""
    r0 = s[base]
    r1 = s[base + 1]
    r2 = s[base + 2]
    r3 = s[base + 3]
    r4 = s[base + 4]
    r5 = s[base + 5]
    r6 = s[base + 6]
    r7 = s[base + 7]
    for j in range(w):
        v0 = r0[j]
        v1 = r1[j]
        v2 = r2[j]
        v3 = r3[j]
        v4 = r4[j]
        v5 = r5[j]
        v6 = r6[j]
        v7 = r7[j]
        v0, v1 = _mn(v0, v1), _mx(v0, v1)
        v2, v3 = _mn(v2, v3), _mx(v2, v3)
        v4, v5 = _mn(v4, v5), _mx(v4, v5)
        v6, v7 = _mn(v6, v7), _mx(v6, v7)
        v0, v2 = _mn(v0, v2), _mx(v0, v2)
        v1, v3 = _mn(v1, v3), _mx(v1, v3)
        v4, v6 = _mn(v4, v6), _mx(v4, v6)
        v5, v7 = _mn(v5, v7), _mx(v5, v7)
        v1, v2 = _mn(v1, v2), _mx(v1, v2)
        v5, v6 = _mn(v5, v6), _mx(v5, v6)
        v0, v4 = _mn(v0, v4), _mx(v0, v4)
        v1, v5 = _mn(v1, v5), _mx(v1, v5)
        v2, v6 = _mn(v2, v6), _mx(v2, v6)
        v3, v7 = _mn(v3, v7), _mx(v3, v7)
        v2, v4 = _mn(v2, v4), _mx(v2, v4)
        v3, v5 = _mn(v3, v5), _mx(v3, v5)
        v1, v2 = _mn(v1, v2), _mx(v1, v2)
        v3, v4 = _mn(v3, v4), _mx(v3, v4)
        v5, v6 = _mn(v5, v6), _mx(v5, v6)
        r0[j] = v0
        r1[j] = v1
        r2[j] = v2
        r3[j] = v3
        r4[j] = v4
        r5[j] = v5
        r6[j] = v6
        r7[j] = v7


@njit(cache=True, nogil=True)
def _merge16(s, base, step, w):
    """Merge the sorted rows base + m*step, m < 8, with the sorted m = 8..15 (columns < w), in registers:
    Batcher's odd-even merge (25 comparators)."""
    r0 = s[base]
    r1 = s[base + 1 * step]
    r2 = s[base + 2 * step]
    r3 = s[base + 3 * step]
    r4 = s[base + 4 * step]
    r5 = s[base + 5 * step]
    r6 = s[base + 6 * step]
    r7 = s[base + 7 * step]
    r8 = s[base + 8 * step]
    r9 = s[base + 9 * step]
    r10 = s[base + 10 * step]
    r11 = s[base + 11 * step]
    r12 = s[base + 12 * step]
    r13 = s[base + 13 * step]
    r14 = s[base + 14 * step]
    r15 = s[base + 15 * step]
    for j in range(w):
        v0 = r0[j]
        v1 = r1[j]
        v2 = r2[j]
        v3 = r3[j]
        v4 = r4[j]
        v5 = r5[j]
        v6 = r6[j]
        v7 = r7[j]
        v8 = r8[j]
        v9 = r9[j]
        v10 = r10[j]
        v11 = r11[j]
        v12 = r12[j]
        v13 = r13[j]
        v14 = r14[j]
        v15 = r15[j]
        v0, v8 = _mn(v0, v8), _mx(v0, v8)
        v1, v9 = _mn(v1, v9), _mx(v1, v9)
        v2, v10 = _mn(v2, v10), _mx(v2, v10)
        v3, v11 = _mn(v3, v11), _mx(v3, v11)
        v4, v12 = _mn(v4, v12), _mx(v4, v12)
        v5, v13 = _mn(v5, v13), _mx(v5, v13)
        v6, v14 = _mn(v6, v14), _mx(v6, v14)
        v7, v15 = _mn(v7, v15), _mx(v7, v15)
        v4, v8 = _mn(v4, v8), _mx(v4, v8)
        v5, v9 = _mn(v5, v9), _mx(v5, v9)
        v6, v10 = _mn(v6, v10), _mx(v6, v10)
        v7, v11 = _mn(v7, v11), _mx(v7, v11)
        v2, v4 = _mn(v2, v4), _mx(v2, v4)
        v3, v5 = _mn(v3, v5), _mx(v3, v5)
        v6, v8 = _mn(v6, v8), _mx(v6, v8)
        v7, v9 = _mn(v7, v9), _mx(v7, v9)
        v10, v12 = _mn(v10, v12), _mx(v10, v12)
        v11, v13 = _mn(v11, v13), _mx(v11, v13)
        v1, v2 = _mn(v1, v2), _mx(v1, v2)
        v3, v4 = _mn(v3, v4), _mx(v3, v4)
        v5, v6 = _mn(v5, v6), _mx(v5, v6)
        v7, v8 = _mn(v7, v8), _mx(v7, v8)
        v9, v10 = _mn(v9, v10), _mx(v9, v10)
        v11, v12 = _mn(v11, v12), _mx(v11, v12)
        v13, v14 = _mn(v13, v14), _mx(v13, v14)
        r0[j] = v0
        r1[j] = v1
        r2[j] = v2
        r3[j] = v3
        r4[j] = v4
        r5[j] = v5
        r6[j] = v6
        r7[j] = v7
        r8[j] = v8
        r9[j] = v9
        r10[j] = v10
        r11[j] = v11
        r12[j] = v12
        r13[j] = v13
        r14[j] = v14
        r15[j] = v15


@njit(cache=True, nogil=True)
def _sort_columns(s, ops, w):
    """Sort each of the first ``w`` columns of s ascending with a :func:`sorting_program`."""
    for o in range(ops.shape[0]):
        kind = ops[o, 0]
        if kind == 0:
            a = s[ops[o, 1]]
            b = s[ops[o, 2]]
            for j in range(w):
                x = a[j]
                y = b[j]
                a[j] = x if x < y else y
                b[j] = y if x < y else x
        elif kind == 1:
            _sort8(s, ops[o, 1], w)
        else:
            _merge16(s, ops[o, 1], ops[o, 2], w)


@njit(cache=True, nogil=True, inline="always")
def _pct(s, j, n, q):
    """numpy 'linear' percentile q of the sorted column s[:n, j], in float64."""
    p = q * (n - 1)
    k = int(p)
    t = p - k
    if t > 0:
        return _lerp(float(s[k, j]), float(s[k + 1, j]), t)
    return float(s[k, j])


@njit(cache=True, nogil=True)
def _pct_rows(s, n, q, w, out):
    """out[j] = :func:`_pct` (s, j, n, q) for j < w, all columns having n values."""
    p = q * (n - 1)
    k = int(p)
    t = p - k
    a = s[k]
    if t > 0:
        b = s[k + 1]
        if t >= 0.5:
            for j in range(w):
                bj = float(b[j])
                out[j] = bj - (bj - float(a[j])) * (1.0 - t)
        else:
            for j in range(w):
                aj = float(a[j])
                out[j] = aj + (float(b[j]) - aj) * t
    else:
        for j in range(w):
            out[j] = float(a[j])


@njit(cache=True, nogil=True)
def _clip_sums(x, i0, i1, w, cen, wid, sd, sdd, kk):
    """Add d = x[i, j] - cen[j] and d*d over rows i0 <= i < i1 where |d| <= wid[j] (the reference's
    keep predicate, in float64) to sd[j], sdd[j], and the count to kk[j]; j < w."""
    for i in range(i0, i1):
        xrow = x[i]
        for j in range(w):
            d = float(xrow[j]) - cen[j]
            keep = abs(d) <= wid[j]
            sd[j] += d if keep else 0.0
            sdd[j] += d * d if keep else 0.0
            kk[j] += 1 if keep else 0


@njit(cache=True, nogil=True, error_model="numpy")
def meanclip_blocks(data, masks, has_mask, variances, use_var, ignore_bits, ops, srows, W, b0, b1,
                    nsigma, niter, no_data_bit, out_value, out_var, out_mask, out_n):
    """MEANCLIP per pixel across ``data`` (N, R, nx) float32, blocks b0 <= b < b1, into the (>= R, nx)
    outputs. Block b is the W pixels from (b % nbx) * W of row b // nbx, nbx = ceil(nx / W); the rows
    that the blocks reach are combined, others are left alone, so a caller can split the blocks
    between threads (the function releases the GIL).

    ``masks`` (int32) / ``variances`` (float32) have the shape of ``data`` when ``has_mask`` /
    ``use_var`` (any 3-D array of that dtype otherwise). ``ops, srows`` = :func:`sorting_program`
    (N); ``W`` = :func:`block_width` (N) pixels per block. Output variance: the sum of the used inputs'
    variances / n**2 when ``use_var``, else the clipped variance / n.
    """
    N = data.shape[0]
    nx = data.shape[2]
    nbx = (nx + W - 1) // W
    inf32 = np.float32(np.inf)
    s = np.empty((max(N, srows), W + ROW_PAD), np.float32)
    s[N:] = inf32                      # rows past N (padding of the network's groups)
    u = np.empty((N if use_var else 1, W), np.float32)
    cnt = np.empty(W, np.int32)
    om = np.empty(W, np.int32)
    iqw = np.empty(W, np.float64)
    cen = np.empty(W, np.float64)
    wid = np.empty(W, np.float64)
    sd = np.empty(W, np.float64)
    sdd = np.empty(W, np.float64)
    vs = np.empty(W, np.float64)
    kk = np.empty(W, np.int32)
    mean = np.empty(W, np.float64)
    var = np.empty(W, np.float64)
    med = np.empty(W, np.float64)
    m1 = np.empty(W, np.float64)
    m2 = np.empty(W, np.float64)
    for b in range(b0, b1):
        r = b // nbx
        x0 = (b - r * nbx) * W
        w = min(W, nx - x0)
        # 1. gather (without masks the counts are taken after the sort, usually from one row)
        for j in range(w):
            cnt[j] = 0
            om[j] = 0
        for i in range(N):
            drow = data[i, r]
            srow = s[i]
            if has_mask:
                mrow = masks[i, r]
                for j in range(w):
                    v = drow[x0 + j]
                    m = mrow[x0 + j]
                    ok = (abs(v) < inf32) & ((m & ignore_bits) == 0)
                    srow[j] = v if ok else inf32
                    cnt[j] += 1 if ok else 0
                    om[j] |= m if ok else 0
            else:
                for j in range(w):
                    v = drow[x0 + j]
                    srow[j] = v if abs(v) < inf32 else inf32
            if use_var:
                urow = u[i]
                for j in range(w):
                    urow[j] = srow[j]
        # 2. sort each pixel's values
        _sort_columns(s, ops, w)
        if not has_mask:
            # admitted = finite; they come first. All N when the last row is finite
            last = s[N - 1]
            ninf = 0
            for j in range(w):
                ninf += 0 if last[j] < inf32 else 1
            if ninf == 0:
                for j in range(w):
                    cnt[j] = N
            else:
                for i in range(N):
                    srow = s[i]
                    for j in range(w):
                        cnt[j] += 1 if srow[j] < inf32 else 0
        # 3. quartiles -> pass-0 centre and width
        nmin = N
        nmax = 0
        for j in range(w):
            nmin = min(nmin, cnt[j])
            nmax = max(nmax, cnt[j])
        if nmin == nmax and nmax > 0:
            # every pixel of the block has the same count (the usual case): the quartiles sit at
            # the same rows for all of them, so they are read row-wise (vectorised)
            _pct_rows(s, nmax, 0.25, w, sd)
            _pct_rows(s, nmax, 0.5, w, cen)
            _pct_rows(s, nmax, 0.75, w, sdd)
            for j in range(w):
                iqw[j] = nsigma * IQR_TO_SIGMA * (sdd[j] - sd[j])
        else:
            for j in range(w):
                n = cnt[j]
                if n == 0:
                    cen[j] = np.nan
                    iqw[j] = np.nan
                    continue
                q1 = _pct(s, j, n, 0.25)
                cen[j] = _pct(s, j, n, 0.5)
                q3 = _pct(s, j, n, 0.75)
                iqw[j] = nsigma * IQR_TO_SIGMA * (q3 - q1)
        for j in range(w):
            # no clip pass: the mean of every admitted value (+inf fails |d| <= DBL_MAX)
            wd = iqw[j] if niter >= 1 else 1.7976931348623157e308
            ok = (abs(cen[j]) < np.inf) & (abs(wd) < np.inf)
            cen[j] = cen[j] if ok else np.nan          # keeps nothing: NaN result, n_used 0
            wid[j] = wd
        # 4. clip passes. Sorted values and a monotone predicate: if the rows mlo and mhi - 1
        # are kept in every pixel of the block, so is every row between them. Their sums about
        # the median are taken once (m1, m2) and re-centred per pass; only the outer rows are
        # scanned. Otherwise (or with input variances, summed over the unsorted values) every
        # row is scanned.
        npass = max(niter, 1)
        src = u if use_var else s
        mlo = max(2, nmin // 8)
        mhi = nmin - mlo
        nmid = mhi - mlo
        use_mid = (not use_var) and nmid >= 8
        if use_mid:
            for j in range(w):
                med[j] = cen[j]
                m1[j] = 0.0
                m2[j] = 0.0
            for i in range(mlo, mhi):
                xrow = s[i]
                for j in range(w):
                    d = float(xrow[j]) - med[j]
                    m1[j] += d
                    m2[j] += d * d
        for it in range(npass):
            mid = use_mid
            if mid:
                nout = 0
                lo_row = s[mlo]
                hi_row = s[mhi - 1]
                for j in range(w):
                    dl = float(lo_row[j]) - cen[j]
                    dh = float(hi_row[j]) - cen[j]
                    nout += 0 if (abs(dl) <= wid[j]) & (abs(dh) <= wid[j]) else 1
                mid = nout == 0
            if mid:
                for j in range(w):
                    delta = cen[j] - med[j]
                    sd[j] = m1[j] - nmid * delta
                    sdd[j] = m2[j] - 2.0 * delta * m1[j] + nmid * (delta * delta)
                    kk[j] = nmid
                _clip_sums(s, 0, mlo, w, cen, wid, sd, sdd, kk)
                _clip_sums(s, mhi, nmax, w, cen, wid, sd, sdd, kk)
            else:
                for j in range(w):
                    sd[j] = 0.0
                    sdd[j] = 0.0
                    kk[j] = 0
                rows = N if use_var else nmax
                _clip_sums(src, 0, rows, w, cen, wid, sd, sdd, kk)
                if use_var:
                    for j in range(w):
                        vs[j] = 0.0
                    for i in range(rows):
                        xrow = src[i]
                        vrow = variances[i, r]
                        for j in range(w):
                            d = float(xrow[j]) - cen[j]
                            vs[j] += float(vrow[x0 + j]) if abs(d) <= wid[j] else 0.0
            # mean and variance of the pass; centre and width of the next one
            for j in range(w):
                k = kk[j]
                kf = float(k)
                s1 = sd[j]
                mj = cen[j] + s1 / kf
                vj = (sdd[j] - s1 * s1 / kf) / (kf - 1.0)
                mj = mj if k > 0 else np.nan
                vj = vj if k > 1 else np.nan
                mean[j] = mj
                var[j] = vj
                wd = nsigma * math.sqrt(vj if vj > 0 else 0.0) if k > 1 else iqw[j]
                ok = (abs(mj) < np.inf) & (abs(wd) < np.inf)
                cen[j] = mj if ok else np.nan
                wid[j] = wd
        # 5. outputs
        for j in range(w):
            k = kk[j]
            out_value[r, x0 + j] = mean[j]
            out_n[r, x0 + j] = k
            out_mask[r, x0 + j] = om[j] if cnt[j] > 0 else no_data_bit
            if k == 0:
                out_var[r, x0 + j] = np.nan
            elif use_var:
                out_var[r, x0 + j] = vs[j] / (k * k)
            else:
                out_var[r, x0 + j] = var[j] / k


# ---------------------------------------------------------------------------------------------------
# the fringe scale fit (calib_core.isr.process.fit_fringe_scale)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def fringe_fit_inputs(image, frame, model, variance, good):
    """The inputs of :func:`fringe_fit_pass` from flat float32 planes: over the pixels with ``good``,
    ``x = frame`` and ``y = image - model`` (a float32 difference), float32 arrays (the values are
    float32: the passes, bound by memory traffic, read half the bytes and compute in float64 all
    the same), and ``w = 1 / variance`` where the variance is finite and positive, else 0 (float64)."""
    n = 0
    for i in range(good.size):
        n += good[i]
    x = np.empty(n, np.float32)
    y = np.empty(n, np.float32)
    w = np.empty(n)
    m = 0
    for i in range(good.size):
        if good[i]:
            x[m] = frame[i]
            y[m] = image[i] - model[i]
            v = np.float64(variance[i])
            w[m] = 1.0 / v if (np.isfinite(v) and v > 0) else 0.0
            m += 1
    return x, y, w


@njit(cache=True, nogil=True)
def _gather_bracket(absr, keep, buf, lo, hi):
    """Copy the kept values within [lo, hi] to the front of ``buf``, branch-free (which side of the
    bracket a residual falls is random); returns (number below lo, number copied, any kept NaN)."""
    below = 0
    m = 0
    nan = False
    for i in range(absr.size):
        r = absr[i]
        kp = keep[i]
        below += kp & (r < lo)
        buf[m] = r
        m += kp & (r >= lo) & (r <= hi)
        nan |= kp & (r != r)
    return below, m, nan


@njit(cache=True, nogil=True)
def _median_in_bracket(buf, below, m, n_keep):
    """``numpy.median`` of the kept values (n_keep of them) from the ``m`` of them in ``buf`` that
    lie in a bracket with ``below`` kept values under it; NaN when the middle ranks are not all in
    the bracket. ``buf`` is reordered."""
    k = n_keep // 2            # numpy.median: rank k, and k - 1 when n_keep is even
    k_lo = k if n_keep % 2 == 1 else k - 1
    if not (below <= k_lo and k < below + m):
        return math.nan
    kk = k - below
    _select(buf, 0, m, kk)
    v_hi = buf[kk]
    if n_keep % 2 == 1:
        return v_hi
    v_lo = buf[0]
    for i in range(1, kk):
        if buf[i] > v_lo:
            v_lo = buf[i]
    return (v_lo + v_hi) / 2.0


@njit(cache=True, nogil=True)
def fringe_fit_pass(x, y, w, sqw, keep, absr, buf, limit, guess):
    """One pass of the clipped weighted regression ``y = a + s x`` of :func:`calib_core.isr.process.fit_fringe_scale`.

    First, unless ``limit`` is NaN (the first pass), the previous pass's clip: ``keep = (w > 0) &
    (absr <= limit)``; when that changes nothing or keeps fewer than 3 pixels, the pass stops there
    (``keep`` is then not to be used again). Then over the pixels with ``keep``: the weighted means
    ``xm``, ``ym``, ``sxx = sum w (x - xm)**2`` and ``s = sum w (x - xm)(y - ym) / sxx``; for every
    pixel, ``absr = |(y - ym - s (x - xm)) sqw|`` (``sqw = sqrt(w)``), and the median of ``absr`` over
    the kept pixels.

    Returns ``(go_on, sxx, s, median)``: ``go_on`` False when the clip stopped the fit; ``s`` and the
    median NaN when ``sxx`` is not positive, the median when a kept residual is NaN. The same
    arithmetic as the NumPy code it replaced except the order of the sums (float64 rounding).

    The median is exact but found without selecting among all pixels: only the kept residuals in a
    bracket (within 10 % of ``guess``, the previous pass's median; failing that, between the 49th
    and 51st percentiles of every 16th pixel) are copied to ``buf`` (scratch of x's size) and
    selected in, with the count of those below; when the middle ranks fall outside both brackets,
    all kept residuals are.
    """
    n = x.size
    if limit == limit:
        n_keep = 0
        changed = False
        for i in range(n):
            k = (w[i] > 0) & (absr[i] <= limit)
            changed |= k != keep[i]
            keep[i] = k
            n_keep += k
        if not changed or n_keep < 3:
            return False, math.nan, math.nan, math.nan
    sw = 0.0
    swx = 0.0
    swy = 0.0
    n_keep = 0
    for i in range(n):
        if keep[i]:
            sw += w[i]
            swx += w[i] * np.float64(x[i])
            swy += w[i] * np.float64(y[i])
            n_keep += 1
    xm = swx / sw
    ym = swy / sw
    sxx = 0.0
    sxy = 0.0
    for i in range(n):
        if keep[i]:
            dx = np.float64(x[i]) - xm
            sxx += w[i] * dx * dx
            sxy += w[i] * dx * (np.float64(y[i]) - ym)
    if not sxx > 0:
        return True, sxx, math.nan, math.nan
    s = sxy / sxx
    lo = 0.9 * guess if guess > 0 else math.inf   # no guess: an empty bracket
    hi = 1.1 * guess if guess > 0 else -math.inf
    below = 0
    m = 0
    nan = False
    for i in range(n):          # the residuals, and the bracket about the guess (as _gather_bracket)
        r = abs((np.float64(y[i]) - ym - s * (np.float64(x[i]) - xm)) * sqw[i])
        absr[i] = r
        kp = keep[i]
        below += kp & (r < lo)
        buf[m] = r
        m += kp & (r >= lo) & (r <= hi)
        nan |= kp & (r != r)
    if nan:                    # numpy.median's answer
        return True, sxx, s, math.nan
    med = _median_in_bracket(buf, below, m, n_keep)
    if med == med:
        return True, sxx, s, med
    m = 0
    for i in range(0, n, 16):
        buf[m] = absr[i]
        m += keep[i]
    if m > 100:
        k1, k2 = int(0.49 * m), int(0.51 * m)
        _select(buf, 0, m, k1)
        _select(buf, k1, m, k2)
        below, m, nan = _gather_bracket(absr, keep, buf, buf[k1], buf[k2])
        med = _median_in_bracket(buf, below, m, n_keep)
        if med == med:
            return True, sxx, s, med
    below, m, nan = _gather_bracket(absr, keep, buf, -math.inf, math.inf)
    return True, sxx, s, _median_in_bracket(buf, 0, m, n_keep)


# ---------------------------------------------------------------------------------------------------
# the satellite-trail search's strip sums (calib_core.sky.streaks._find_line)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def strip_scores(u, v, q, det, c, s, radius, cell, seg, n_rho, n_seg, n_det, g, coherent_fraction,
                 min_detector_score, sig_out):
    """Steps 3-4 of :mod:`calib_core.sky.streaks` for the angles with cosines ``c`` and sines ``s``, one
    angle at a time in scratch the size of one angle's cells (``_find_line`` did each step on
    every angle of a chunk at once, in arrays of millions of elements, NumPy pass after pass).

    Bins at ``u``, ``v`` (mm) with anomaly ``q`` on detector index ``det`` fall in cell
    ``floor((-u s + v c + radius) / cell)`` across the line and segment ``floor((u c + v s + radius)
    / seg)`` along it; strip ``j`` is cells ``j`` and ``j + 1``; with ``g`` > 0 a piece counts by how
    far its ``sum(q)`` rises above the higher mean of the strips ``g`` cells to either side, and only
    where both hold bins. Returns ``(score, n_sig)`` of shape (n_angles, n_rho - 1): the sum of the
    weakest ``coherent_fraction`` of the pieces' significances over sqrt of their number (-inf with
    fewer than 2 pieces), and the number of detectors on which the strip's ``sum(q) / sqrt(n)`` is at
    least ``min_detector_score``. ``sig_out`` (n_rho - 1, n_seg), unless it is empty, gets the last
    angle's piece significances (NaN where a piece does not count).

    The arithmetic is ``_find_line``'s NumPy expressions, operation for operation, with the sums in
    the same order (tests/test_streaks.py keeps them as the reference): the same scores to the bit.
    """
    n_a = c.size
    J = n_rho - 1
    score = np.empty((n_a, J))
    n_sig = np.zeros((n_a, J), np.int64)
    sq = np.empty((n_rho, n_seg))
    nn = np.empty((n_rho, n_seg))
    dq = np.empty((n_rho, n_det))
    dn = np.empty((n_rho, n_det))
    SQ = np.empty((J, n_seg))
    NN = np.empty((J, n_seg))
    buf = np.empty(n_seg)
    want_sig = sig_out.size > 0
    for a in range(n_a):
        sq[:] = 0.0
        nn[:] = 0.0
        dq[:] = 0.0
        dn[:] = 0.0
        ca = c[a]
        sa = s[a]
        for b in range(u.size):
            i = np.int64(math.floor((-u[b] * sa + v[b] * ca + radius) / cell))
            k = np.int64(math.floor((u[b] * ca + v[b] * sa + radius) / seg))
            sq[i, k] += q[b]
            nn[i, k] += 1.0
            dq[i, det[b]] += q[b]
            dn[i, det[b]] += 1.0
        for j in range(J):
            for k in range(n_seg):
                SQ[j, k] = sq[j, k] + sq[j + 1, k]
                NN[j, k] = nn[j, k] + nn[j + 1, k]
        for j in range(J):
            n_piece = 0
            for k in range(n_seg):
                nk = NN[j, k]
                use = nk > 0
                sig = math.nan
                if g > 0:
                    nl = NN[j - g, k] if j - g >= 0 else 0.0
                    nr = NN[j + g, k] if j + g < J else 0.0
                    use = use and nl > 0 and nr > 0
                    if use:
                        ml = SQ[j - g, k] / nl
                        mr = SQ[j + g, k] / nr
                        left = ml >= mr
                        fn = nl if left else nr
                        x = SQ[j, k] - nk * (ml if left else mr)
                        var = nk * (1.0 + nk / fn)
                        sig = x / math.sqrt(var)
                elif use:
                    sig = SQ[j, k] / math.sqrt(nk)
                if use:
                    buf[n_piece] = sig
                    n_piece += 1
                if want_sig and a == n_a - 1:
                    sig_out[j, k] = sig
            if n_piece >= 2:
                m = max(np.int64(math.floor(coherent_fraction * n_piece + 1e-9)), 1)
                for t in range(1, n_piece):        # insertion sort: a strip has a few dozen pieces
                    val = buf[t]
                    r = t - 1
                    while r >= 0 and buf[r] > val:
                        buf[r + 1] = buf[r]
                        r -= 1
                    buf[r + 1] = val
                total = buf[0]
                for t in range(1, m):
                    total += buf[t]
                score[a, j] = total / math.sqrt(m)
            else:
                score[a, j] = -math.inf
            for d in range(n_det):
                dQ = dq[j, d] + dq[j + 1, d]
                dN = dn[j, d] + dn[j + 1, d]
                dsig = dQ / math.sqrt(dN) if dN > 0 else 0.0
                n_sig[a, j] += dsig >= min_detector_score
    return score, n_sig


# ---------------------------------------------------------------------------------------------------
# the fringe frame's continuum removal (calib_core.builds.fringe.remove_continuum)
# ---------------------------------------------------------------------------------------------------


# usable pixel: (mask[i] & bits) == 0 and finite image and variance, written out in each kernel (as
# an inline="always" helper it cost ~60 ns a pixel)


@njit(cache=True, nogil=True)
def continuum_totals(image, variance, mask, bits, total, count):
    """Add one input's usable pixels (no ``bits`` in the mask, finite image and variance) to
    ``total`` (float64) and count them in ``count``, in place; flat arrays."""
    for i in range(image.size):
        if (mask[i] & bits) == 0 and math.isfinite(image[i]) and math.isfinite(variance[i]):
            total[i] += np.float64(image[i])
            count[i] += 1.0


@njit(cache=True, nogil=True)
def continuum_bins(image, variance, mask, bits, total, count, lab, nb):
    """Per bin (``lab``: each pixel's bin, of ``nb``), for one input: over its usable pixels the
    count ``k``, the sums of the image ``sy`` and of the variance ``sv``; over the pixels it and
    the others have (``both``) the count ``kb``, the sums of the others' mean ``sref`` and of the
    image ``syb``. In pixel order, as ``np.bincount``'s sums: the same values to the bit.

    A bin's running sums are held in registers while consecutive pixels stay in it (a bin is a
    run of ``bin_size`` pixels along a row): six sums kept in memory would wait on each other's
    stores at every pixel."""
    acc = np.zeros((nb, 6))
    cur = -1
    k = sy = sv = kb = sref = syb = 0.0
    for i in range(image.size):
        b = lab[i]
        if b != cur:
            if cur >= 0:
                acc[cur, 0] = k
                acc[cur, 1] = sy
                acc[cur, 2] = sv
                acc[cur, 3] = kb
                acc[cur, 4] = sref
                acc[cur, 5] = syb
            cur = b
            k = acc[b, 0]
            sy = acc[b, 1]
            sv = acc[b, 2]
            kb = acc[b, 3]
            sref = acc[b, 4]
            syb = acc[b, 5]
        if (mask[i] & bits) == 0 and math.isfinite(image[i]) and math.isfinite(variance[i]):
            y = np.float64(image[i])
            k += 1.0
            sy += y
            sv += np.float64(variance[i])
            others = count[i] - 1.0
            if others > 0:
                kb += 1.0
                sref += (total[i] - y) / max(others, 1.0)
                syb += y
    if cur >= 0:
        acc[cur, 0] = k
        acc[cur, 1] = sy
        acc[cur, 2] = sv
        acc[cur, 3] = kb
        acc[cur, 4] = sref
        acc[cur, 5] = syb
    return acc[:, 0].copy(), acc[:, 1].copy(), acc[:, 2].copy(), acc[:, 3].copy(), acc[:, 4].copy(), acc[:, 5].copy()


@njit(cache=True, nogil=True)
def continuum_deviations(image, variance, mask, bits, total, count, lab, mref, myb, dref, dy, wv):
    """For one input, over the pixels it and the others have (else 0): the others' mean less its
    bin mean ``mref`` into ``dref``, the image less its bin mean ``myb`` into ``dy``, and the
    variance (float64) into ``wv`` (buffers of the image's size, reused across inputs)."""
    for i in range(image.size):
        if ((mask[i] & bits) == 0 and math.isfinite(image[i]) and math.isfinite(variance[i])
                and count[i] - 1.0 > 0):
            y = np.float64(image[i])
            b = lab[i]
            dref[i] = (total[i] - y) / max(count[i] - 1.0, 1.0) - mref[b]
            dy[i] = y - myb[b]
            wv[i] = np.float64(variance[i])
        else:
            dref[i] = 0.0
            dy[i] = 0.0
            wv[i] = 0.0


@njit(cache=True, nogil=True)
def _pairwise_leaf(a, lo, n):
    """NumPy's pairwise sum of a block of at most 128 values (see :func:`pairwise_sum`)."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    m = n - n % 8
    while i < m:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True)
def pairwise_sum(a, lo, n):
    """``numpy.sum`` of a[lo:lo + n] (contiguous float64) bit for bit: NumPy's pairwise summation
    (numpy/_core/src/umath/loops_utils.h.src: 8 accumulators over blocks of up to 128 values; a
    longer range is the sum of its halves, the first rounded down to a multiple of 8). The halving
    runs on an explicit stack (a recursive numba function with ``cache=True`` crashed when loaded
    from the cache)."""
    if n <= 128:
        return _pairwise_leaf(a, lo, n)
    nodes = np.empty((128, 3), np.int64)       # (lo, n, 1 = add the two values on top)
    vals = np.empty(64)
    top = 0
    nv = 0
    nodes[0, 0], nodes[0, 1], nodes[0, 2] = lo, n, 0
    top = 1
    while top > 0:
        top -= 1
        l0, m, combine = nodes[top, 0], nodes[top, 1], nodes[top, 2]
        if combine:
            nv -= 1
            vals[nv - 1] = vals[nv - 1] + vals[nv]
        elif m <= 128:
            vals[nv] = _pairwise_leaf(a, l0, m)
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            nodes[top, 0], nodes[top, 1], nodes[top, 2] = l0, m, 1
            nodes[top + 1, 0], nodes[top + 1, 1], nodes[top + 1, 2] = l0 + m2, m - m2, 0
            nodes[top + 2, 0], nodes[top + 2, 1], nodes[top + 2, 2] = l0, m2, 0
            top += 3
    return vals[0]


@njit(cache=True, nogil=True)
def refine_scores(u, v, q, sn, cs, offsets, half):
    """The strip scores of :func:`calib_core.sky.streaks._refine`: for each offset ``r`` and angle (sine
    ``sn``, cosine ``cs``) the bins within ``half`` of the line, ``|-u sn + v cs - r| <= half``, and
    ``sum(q) / sqrt(n)`` over them (-inf with none); (n_offsets, n_angles). The sum is NumPy's
    pairwise sum over every bin, the others contributing ``0 * q``, so the scores are those of the
    NumPy expression to the bit."""
    nb = u.size
    out = np.empty((offsets.size, sn.size))
    row = np.empty(nb)
    for j in range(offsets.size):
        r = offsets[j]
        for a in range(sn.size):
            n = 0
            for b in range(nb):
                on = abs(-u[b] * sn[a] + v[b] * cs[a] - r) <= half
                row[b] = q[b] if on else 0.0 * q[b]
                n += on
            out[j, a] = pairwise_sum(row, 0, nb) / math.sqrt(n) if n > 0 else -math.inf
    return out


# ---------------------------------------------------------------------------------------------------
# ISR interpolation over bad pixels: row bridges (calib_core.isr.process.interpolate_over)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _interp_one(plane, y, good, ng, j, x):
    """``np.interp(x, good[:ng], plane[y, good[:ng]])`` for ``good[j] <= x < good[j + 1]`` (j = -1:
    left of every good pixel), with NumPy's arithmetic: float64 slope times offset plus left value,
    its NaN fallbacks, and the end values beyond the last good pixels."""
    if j < 0:
        return np.float64(plane[y, good[0]])
    if j >= ng - 1:
        return np.float64(plane[y, good[ng - 1]])
    xl = good[j]
    fl = np.float64(plane[y, xl])
    if xl == x:
        return fl
    xr = good[j + 1]
    fr = np.float64(plane[y, xr])
    slope = (fr - fl) / np.float64(xr - xl)
    res = slope * np.float64(x - xl) + fl
    if math.isnan(res):
        res = slope * np.float64(x - xr) + fr
        if math.isnan(res) and fl == fr:
            res = fl
    return res


@njit(cache=True, nogil=True)
def bridge_rows(image, variance, bad, target):
    """In place: each ``target`` pixel of ``image`` and ``variance`` gets the linear interpolation,
    along its row, between the nearest pixels not in ``bad`` (the end value beyond the last one);
    rows with no good pixel are left alone. ``target`` must lie inside ``bad``. The loop of
    ``np.interp`` calls it replaced is kept in tests/test_isr.py as its reference."""
    ny, nx = bad.shape
    good = np.empty(nx, np.int64)
    for y in range(ny):
        wanted = False
        for x in range(nx):
            if target[y, x]:
                wanted = True
                break
        if not wanted:
            continue
        ng = 0
        for x in range(nx):
            if not bad[y, x]:
                good[ng] = x
                ng += 1
        if ng == 0:
            continue
        j = -1
        for x in range(nx):
            while j + 1 < ng and good[j + 1] <= x:
                j += 1
            if target[y, x]:
                image[y, x] = _interp_one(image, y, good, ng, j, x)
                variance[y, x] = _interp_one(variance, y, good, ng, j, x)


# ---------------------------------------------------------------------------------------------------
# ISR's per-pixel arithmetic (calib_core.isr.process): one sweep each, NumPy's arithmetic exactly
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def subtract_level(data, level, out):
    """``out = float32(float64(data) - level)``: an amplifier's overscan-subtracted pixels, with
    ``level`` (float64, 2-D) of shape (1, 1), (ny, 1) or (1, nx) broadcast as NumPy would."""
    ny, nx = data.shape
    per_row = level.shape[0] > 1
    per_col = level.shape[1] > 1
    for i in range(ny):
        li = i if per_row else 0
        for j in range(nx):
            out[i, j] = np.float32(np.float64(data[i, j]) - level[li, j if per_col else 0])


@njit(cache=True, nogil=True, error_model="numpy")
def calibrate_pixels(image, mask, variance, gain, read_noise, do_bias, bias_i, bias_m, bias_v, do_variance,
                     do_dark, c, dark_i, dark_m, dark_v, do_flat, flat_i, flat_m, flat_v):
    """ISR's bias, variance, dark and flat steps in one sweep, in place, each step as
    :class:`calib_core.maskedimage.MaskedImage`'s NumPy arithmetic computes it in float32 (same
    operations, same order, so the same bits; a zero flat pixel gives inf or NaN as NumPy does):

    * bias: ``image -= b``, ``variance += b_var``, ``mask |= b_mask``;
    * variance: ``variance += maximum(image, 0) / gain + (read_noise / gain)**2`` (NaN stays NaN);
    * dark: ``image -= c*d``, ``variance += (c*c)*d_var``, ``mask |= d_mask`` (``c`` float32);
    * flat: ``variance = (variance + (image*image)*f_var/(f*f)) / (f*f)``, ``image /= f``, ``mask |= f_mask``.

    A step that is off is skipped; its arrays are not read (any array of the right dtype will do).
    """
    ny, nx = image.shape
    cc = c * c
    for i in range(ny):
        for j in range(nx):
            x = image[i, j]
            v = variance[i, j]
            m = mask[i, j]
            if do_bias:
                x = x - bias_i[i, j]
                v = v + bias_v[i, j]
                m |= bias_m[i, j]
            if do_variance:
                s = x
                if s <= np.float32(0.0):
                    s = np.float32(0.0)
                g = gain[i, j]
                r = read_noise[i, j] / g
                v = v + (s / g + r * r)
            if do_dark:
                x = x - c * dark_i[i, j]
                v = v + cc * dark_v[i, j]
                m |= dark_m[i, j]
            if do_flat:
                f = flat_i[i, j]
                b2 = f * f
                v = (v + (x * x) * flat_v[i, j] / b2) / b2
                x = x / f
                m |= flat_m[i, j]
            image[i, j] = x
            variance[i, j] = v
            mask[i, j] = m
