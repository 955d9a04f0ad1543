"""numba kernels for the hot paths: byte swapping and per-pixel stack statistics.

The per-pixel statistics here must agree with the NumPy reference in :mod:`calib_core.stats`
(tests/test_stack.py checks it). Differences from the reference are only in float64 rounding:
sums are accumulated about the pass centre (shifted sums) instead of with a separate mean pass.

Quartiles and medians use in-place selection (Hoare partition quickselect) on a per-pixel scratch
buffer instead of a full sort; the median is found first, then Q3 in the upper part, then Q1 in the
lower part, so each later selection only touches half of the values.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["bswap32_inplace", "stack_kernel", "gather_admitted", "meanclip_sorted", "STAT_CODES"]

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
def _quartiles(s, n):
    """Q1, median, Q3 of s[:n] (numpy 'linear' percentiles); s is reordered."""
    p = 0.5 * (n - 1)
    k2 = int(math.floor(p))
    f2 = p - k2
    _select(s, 0, n, k2)
    m_lo = s[k2]
    m_hi = _min_range(s, k2 + 1, n) if k2 + 1 < n else m_lo
    med = _lerp(m_lo, m_hi, f2) if f2 > 0 else m_lo

    p3 = 0.75 * (n - 1)
    k3 = int(math.floor(p3))
    f3 = p3 - k3
    if k3 == k2:
        q3_lo = m_lo
        q3_hi = m_hi
    else:
        _select(s, k2 + 1, n, k3)
        q3_lo = s[k3]
        q3_hi = _min_range(s, k3 + 1, n) if k3 + 1 < n else q3_lo
    q3 = _lerp(q3_lo, q3_hi, f3) if f3 > 0 else q3_lo

    p1 = 0.25 * (n - 1)
    k1 = int(math.floor(p1))
    f1 = p1 - k1
    if k1 == k2:
        q1_lo = m_lo
        q1_hi = m_hi
    else:
        _select(s, 0, k2, k1)
        q1_lo = s[k1]
        q1_hi = _min_range(s, k1 + 1, k2) if k1 + 1 < k2 else m_lo
    q1 = _lerp(q1_lo, q1_hi, f1) if f1 > 0 else q1_lo
    return q1, med, q3


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
                 nsigma, niter, nlow, nhigh, no_data_bit,
                 out_value, out_var, out_mask, out_n):
    """Per-pixel statistic across ``data`` (N, R, nx) float32 into the (R, nx) outputs.

    ``masks`` (int32) and ``variances`` (float32) have the shape of ``data`` when ``has_mask`` /
    ``use_var`` are true (pass any 3-D array of that dtype otherwise). Input i is multiplied by
    ``inv_scale[i]`` (variance by its square) after admission. ``stat`` is a :data:`STAT_CODES`
    value. Output variance: from the inputs' variances (sum over used / n**2) when ``use_var``,
    else error**2 from the spread.
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
            if stat == 0 or (stat == 1 and niter < 1):  # MEAN
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
            elif stat == 1:  # MEANCLIP
                for j in range(n):
                    s[j] = buf[j]
                q1, med, q3 = _quartiles(s, n)
                iqr_width = nsigma * IQR_TO_SIGMA * (q3 - q1)
                centre = med
                width = iqr_width
                for it in range(niter):
                    if it > 0:
                        centre = mean
                        if nu > 1:
                            width = nsigma * math.sqrt(var if var > 0 else 0.0)
                        else:
                            width = iqr_width
                    if not (math.isfinite(centre) and math.isfinite(width)):
                        mean = np.nan
                        var = np.nan
                        nu = 0
                        break
                    sd = 0.0
                    sdd = 0.0
                    k = 0
                    vsum = 0.0
                    for j in range(n):
                        d = buf[j] - centre
                        if abs(d) <= width:
                            sd += d
                            sdd += d * d
                            k += 1
                            if use_var:
                                vsum += vbuf[j]
                    nu = k
                    if k > 0:
                        mean = centre + sd / k
                        var = (sdd - sd * sd / k) / (k - 1) if k > 1 else np.nan
                    else:
                        mean = np.nan
                        var = np.nan
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
# MEANCLIP hot path: gather -> numpy sort -> clip on sorted rows.
#
# Sorting ~40 values per pixel with branching comparisons costs ~1 us per pixel on random data
# (half the comparisons are mispredicted). numpy's sort of short contiguous float32 rows uses
# SIMD sorting networks and is ~10x faster, so the hot path is: (1) gather each pixel's admitted
# values into a contiguous row (non-admitted -> +inf, sorted to the end); (2) ``ndarray.sort`` along
# the rows (releases the GIL); (3) on each sorted row, quartiles are direct look-ups, and because
# ``fl(x - c)`` is monotone in x the kept set ``|x - c| <= w`` of every pass is a contiguous index
# range: it is found by scanning in from both ends (cost = number rejected) with the *same* float64
# predicate as the reference, and its sums come from float64 prefix sums about the median.
# ---------------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def gather_admitted(data, masks, has_mask, ignore_bits, r0, r1, out, om, cnt):
    """Rows r0:r1 of ``data`` (N, R, nx) -> ``out`` ((r1-r0)*nx, N) float32 with non-admitted
    values set to +inf; ``om`` = OR of the admitted masks, ``cnt`` = number admitted per pixel."""
    N, R, nx = data.shape
    p = 0
    for r in range(r0, r1):
        for x in range(nx):
            o = 0
            c = 0
            for i in range(N):
                v = data[i, r, x]
                ok = math.isfinite(v)
                if has_mask:
                    m = masks[i, r, x]
                    if (m & ignore_bits) != 0:
                        ok = False
                    elif ok:
                        o |= m
                out[p, i] = v if ok else np.inf
                c += 1 if ok else 0
            om[p] = o
            cnt[p] = c
            p += 1


@njit(cache=True, nogil=True, inline="always")
def _range_sums(srt, p, lo, hi, ref):
    """Sums of d and d*d, d = srt[p, j] - ref over j in [lo, hi), four accumulators per sum."""
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    b0 = 0.0
    b1 = 0.0
    b2 = 0.0
    b3 = 0.0
    j = lo
    while j + 4 <= hi:
        d0 = float(srt[p, j]) - ref
        d1 = float(srt[p, j + 1]) - ref
        d2 = float(srt[p, j + 2]) - ref
        d3 = float(srt[p, j + 3]) - ref
        a0 += d0
        a1 += d1
        a2 += d2
        a3 += d3
        b0 += d0 * d0
        b1 += d1 * d1
        b2 += d2 * d2
        b3 += d3 * d3
        j += 4
    while j < hi:
        d0 = float(srt[p, j]) - ref
        a0 += d0
        b0 += d0 * d0
        j += 1
    return (a0 + a1) + (a2 + a3), (b0 + b1) + (b2 + b3)


@njit(cache=True, nogil=True)
def meanclip_sorted(srt, cnt, om, nsigma, niter, no_data_bit, r0, nx,
                    out_value, out_var, out_mask, out_n):
    """MEANCLIP of each sorted row ``srt[p, :cnt[p]]``; results go to row ``r0 + p // nx``.

    Sums are kept about the median: the first pass sums its kept range directly; later passes
    adjust those sums by the few values that enter or leave the range.
    """
    P, N = srt.shape
    nrows = P // nx
    # reciprocals instead of per-pixel divisions (divisions dominate the per-pixel cost)
    inv = np.empty(N + 1, np.float64)
    invm1 = np.empty(N + 1, np.float64)
    for k in range(N + 1):
        inv[k] = 1.0 / k if k > 0 else np.nan
        invm1[k] = 1.0 / (k - 1) if k > 1 else np.nan
    for rr in range(nrows):
        r = r0 + rr
        for x in range(nx):
            p = rr * nx + x
            n = cnt[p]
            if n == 0:
                out_value[r, x] = np.nan
                out_var[r, x] = np.nan
                out_mask[r, x] = no_data_bit
                out_n[r, x] = 0
                continue
            out_mask[r, x] = om[p]
            pm = 0.5 * (n - 1)
            k = int(pm)
            t = pm - k
            med = _lerp(float(srt[p, k]), float(srt[p, k + 1]), t) if t > 0 else float(srt[p, k])
            pq = 0.25 * (n - 1)
            k = int(pq)
            t = pq - k
            q1 = _lerp(float(srt[p, k]), float(srt[p, k + 1]), t) if t > 0 else float(srt[p, k])
            pq = 0.75 * (n - 1)
            k = int(pq)
            t = pq - k
            q3 = _lerp(float(srt[p, k]), float(srt[p, k + 1]), t) if t > 0 else float(srt[p, k])
            iqrw = nsigma * IQR_TO_SIGMA * (q3 - q1)
            centre = med
            width = iqrw
            mean = np.nan
            var = np.nan
            nu = 0
            if niter < 1:
                sd0, sdd0 = _range_sums(srt, p, 0, n, med)
                nu = n
                mean = med + sd0 * inv[n]
                var = (sdd0 - sd0 * sd0 * inv[n]) * invm1[n]
            plo = 0
            phi = 0
            sd0 = 0.0
            sdd0 = 0.0
            for it in range(niter):
                if it > 0:
                    centre = mean
                    width = nsigma * math.sqrt(var if var > 0 else 0.0) if nu > 1 else iqrw
                if not (math.isfinite(centre) and math.isfinite(width)):
                    mean = np.nan
                    var = np.nan
                    nu = 0
                    break
                lo = 0
                while lo < n and not (abs(float(srt[p, lo]) - centre) <= width) and float(srt[p, lo]) < centre:
                    lo += 1
                hi = n
                while hi > lo and not (abs(float(srt[p, hi - 1]) - centre) <= width):
                    hi -= 1
                kk = hi - lo
                nu = kk
                if kk == 0:
                    mean = np.nan
                    var = np.nan
                    plo = 0
                    phi = 0
                    sd0 = 0.0
                    sdd0 = 0.0
                    continue
                if phi <= plo or hi <= plo or lo >= phi:
                    sd0, sdd0 = _range_sums(srt, p, lo, hi, med)
                else:
                    if lo > plo:
                        a, b = _range_sums(srt, p, plo, lo, med)
                        sd0 -= a
                        sdd0 -= b
                    elif lo < plo:
                        a, b = _range_sums(srt, p, lo, plo, med)
                        sd0 += a
                        sdd0 += b
                    if hi < phi:
                        a, b = _range_sums(srt, p, hi, phi, med)
                        sd0 -= a
                        sdd0 -= b
                    elif hi > phi:
                        a, b = _range_sums(srt, p, phi, hi, med)
                        sd0 += a
                        sdd0 += b
                plo = lo
                phi = hi
                delta = centre - med
                sd = sd0 - kk * delta
                sdd = sdd0 - 2.0 * delta * sd0 + kk * delta * delta
                mean = centre + sd * inv[kk]
                var = (sdd - sd * sd * inv[kk]) * invm1[kk]
            out_value[r, x] = mean
            out_n[r, x] = nu
            out_var[r, x] = var * inv[nu] if nu > 0 else np.nan
