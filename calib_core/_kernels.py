"""numba kernels for the hot paths: byte swapping and per-pixel stack statistics.

The per-pixel statistics here must agree with the NumPy reference in :mod:`calib_core.stats`
(tests/test_stack.py checks it). Differences from the reference are only in float64 rounding:
sums are accumulated about a centre (shifted sums) instead of with a separate mean pass.

MEANCLIP (:func:`meanclip_network`) works on blocks of adjacent pixels with a sorting network and
branchless clip passes, vectorised across the pixels of a block (see the comment above it).
MEAN, MEDIAN and MINMAX (:func:`stack_kernel`) work pixel by pixel; the median uses in-place
selection (Hoare partition quickselect, :func:`_select`, also used by :mod:`calib_core.binstats`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

__all__ = ["bswap32_inplace", "stack_kernel", "meanclip_network", "sorting_network", "block_width",
           "STAT_CODES"]

#: statistics with a numba kernel: MEANCLIP -> :func:`meanclip_network`, the others -> :func:`stack_kernel`
STAT_CODES = {"MEAN": 0, "MEANCLIP": 1, "MEDIAN": 2, "MINMAX": 3}

IQR_TO_SIGMA = 0.741301109252802


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
    ``inv_scale[i]`` (variance by its square) after admission. ``stat`` is the :data:`STAT_CODES`
    value of MEAN, MEDIAN or MINMAX (MEANCLIP has its own kernel, :func:`meanclip_network`).
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
#   2. sort each column with a fixed comparator network (Batcher odd-even merge sort for N inputs):
#      each comparator (a, b) is s[a, :] , s[b, :] = min, max over the W lanes;
#   3. Q1/median/Q3 per pixel: numpy 'linear' percentiles, read at the pixel's own count;
#   4. each clip pass: masked sums over the N rows of d = x - centre where |d| <= width (the exact
#      predicate of the reference, in float64), so the kept set is the reference's set; then
#      mean = centre + sum(d) / k, var = (sum(d*d) - sum(d)**2 / k) / (k - 1).
# Sums run about each pass's centre (shifted sums) instead of a separate mean pass: the results differ
# from the NumPy reference only by float64 rounding.
# ---------------------------------------------------------------------------------------------------


def sorting_network(n: int) -> np.ndarray:
    """Comparators of Batcher's odd-even merge sort for ``n`` keys, as an int64 array (C, 2) of
    (a, b) with a < b: after ``x[a], x[b] = min, max`` for every row in order, x is ascending.

    Built for the next power of two and pruned: a key at index >= n acts as +inf, so a comparator
    that touches one never moves anything.
    """
    return _network(int(n)).copy()


@functools.lru_cache(maxsize=64)
def _network(n: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"a sorting network needs n >= 1, got {n}")
    p2 = 1
    while p2 < n:
        p2 *= 2
    comps = []
    p = 1
    while p < p2:
        k = p
        while k >= 1:
            for j in range(k % p, p2 - k, 2 * k):
                for i in range(min(k, p2 - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        comps.append((a, b))
            k //= 2
        p *= 2
    out = np.array(comps, np.int64).reshape(-1, 2)
    out.flags.writeable = False
    return out


def block_width(n: int) -> int:
    """Pixels per block: the block (n * W float32) stays within ~64 KB (L1/L2), W a multiple of 16
    (whole vectors), 16 <= W <= 512."""
    w = (65536 // (4 * max(1, n))) // 16 * 16
    return max(16, min(512, w))


@njit(cache=True, nogil=True)
def _network_sort(s, comps, w):
    """Sort each of the first ``w`` columns of s (N, W) ascending with the comparators ``comps``."""
    for c in range(comps.shape[0]):
        a = s[comps[c, 0]]
        b = s[comps[c, 1]]
        for j in range(w):
            x = a[j]
            y = b[j]
            a[j] = x if x < y else y
            b[j] = y if x < y else x


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


@njit(parallel=True, cache=True, nogil=True)
def meanclip_network(data, masks, has_mask, variances, use_var, ignore_bits, comps, block, pieces,
                     nrows, nsigma, niter, no_data_bit, out_value, out_var, out_mask, out_n):
    """MEANCLIP per pixel across rows :nrows of ``data`` (N, >= nrows, nx) float32 into the
    (nrows, nx) outputs.

    ``masks`` (int32) / ``variances`` (float32) have the shape of ``data`` when ``has_mask`` /
    ``use_var`` (any 3-D array of that dtype otherwise). ``comps`` = :func:`sorting_network` (N),
    ``block`` = pixels per block (:func:`block_width`); the blocks are shared out in ``pieces``
    contiguous runs (the parallel work items; a few per thread). Output variance: sum of the used inputs'
    variances / n**2 when ``use_var``, else the clipped variance / n.
    """
    N = data.shape[0]
    nx = data.shape[2]
    R = nrows
    W = block
    nbx = (nx + W - 1) // W
    nb = R * nbx
    nchunks = max(1, min(nb, pieces))
    inf32 = np.float32(np.inf)
    for ch in prange(nchunks):
        b0 = ch * nb // nchunks
        b1 = (ch + 1) * nb // nchunks
        s = np.empty((N, W), np.float32)
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
            # 1. gather
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
                        ok = abs(v) < inf32
                        srow[j] = v if ok else inf32
                        cnt[j] += 1 if ok else 0
                if use_var:
                    urow = u[i]
                    for j in range(w):
                        urow[j] = srow[j]
            # 2. sort each pixel's values
            _network_sort(s, comps, w)
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
                wid[j] = iqw[j] if niter >= 1 else (1.7976931348623157e308 if cnt[j] > 0 else np.nan)
            # 4. clip passes. Sorted values and a monotone predicate: if the rows lo and hi - 1 are
            # kept in every pixel of the block, so is every row between them. Their sums about the
            # median are taken once (m1, m2) and re-centred per pass; only the outer rows are
            # scanned. Otherwise (or with input variances, summed over the unsorted values) every
            # row is scanned.
            npass = max(niter, 1)
            src = u if use_var else s
            mlo = max(2, nmin // 8)
            mhi = nmin - mlo
            use_mid = (not use_var) and mhi - mlo >= 8
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
            nmid = mhi - mlo
            for it in range(npass):
                if it > 0:
                    for j in range(w):
                        cen[j] = mean[j]
                        vv = var[j] if var[j] > 0 else 0.0
                        wid[j] = nsigma * math.sqrt(vv) if kk[j] > 1 else iqw[j]
                for j in range(w):
                    if not (math.isfinite(cen[j]) and math.isfinite(wid[j])):
                        cen[j] = np.nan            # keeps nothing: NaN result, n_used 0
                mid = use_mid
                if mid:
                    out = 0
                    lo_row = s[mlo]
                    hi_row = s[mhi - 1]
                    for j in range(w):
                        dl = float(lo_row[j]) - cen[j]
                        dh = float(hi_row[j]) - cen[j]
                        out += 0 if (abs(dl) <= wid[j]) & (abs(dh) <= wid[j]) else 1
                    mid = out == 0
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
                        vs[j] = 0.0
                        kk[j] = 0
                    rows = N if use_var else nmax
                    _clip_sums(src, 0, rows, w, cen, wid, sd, sdd, kk)
                    if use_var:
                        for i in range(rows):
                            xrow = src[i]
                            vrow = variances[i, r]
                            for j in range(w):
                                d = float(xrow[j]) - cen[j]
                                vs[j] += float(vrow[x0 + j]) if abs(d) <= wid[j] else 0.0
                for j in range(w):
                    k = kk[j]
                    if k > 0:
                        mean[j] = cen[j] + sd[j] / k
                        var[j] = (sdd[j] - sd[j] * sd[j] / k) / (k - 1) if k > 1 else np.nan
                    else:
                        mean[j] = np.nan
                        var[j] = np.nan
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
