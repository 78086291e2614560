"""aug+ colour ops on the CPU: one numba-compiled function runs a view's whole chain per sample.

Why: the batched torch ops (augment.py) cost ~5.5 ms per image at 224 px on one core (blur, hue, and the
gathering and scattering of the samples each random op applies to). Here each sample is converted to a
planar float32 image once, the ops it drew run in place on that buffer in one cache-resident pass each
(no op runs on a sample that did not draw it, nothing is gathered), and the last pass writes the
normalised, possibly flipped result into the batch. The arithmetic is augment.py's, in float32 and in the
same order, so the two paths differ by float rounding only (tested); the parameters are the ones
augment.draw gives, so the random stream of the augmentation is unchanged.

The function releases the GIL: ffcv_io runs it on slices of a batch in several Python threads.
"""

import numpy as np
from numba import njit

F32 = np.float32
_ZERO, _ONE, _TWO, _FOUR, _SIX = F32(0.0), F32(1.0), F32(2.0), F32(4.0), F32(6.0)
_LUMA = (F32(0.2989), F32(0.587), F32(0.114))  # ITU-R 601, as torchvision's rgb_to_grayscale
_HUE_OFFSETS = (F32(17 / 6), F32(15 / 6), F32(13 / 6))  # (n + 12) / 6, n = 5, 3, 1 (augment.adjust_hue)
_EPS = F32(1e-12)
_U8 = F32(255.0)
_TAP_MIN = F32(2.0**-26)  # blur taps below this are skipped (see _blur)


@njit(nogil=True, cache=True, error_model="numpy")
def _clamp01(v: np.float32) -> np.float32:
    return min(max(v, _ZERO), _ONE)


# Every op works on one row (1-D, contiguous) at a time: LLVM vectorises those loops, not 2-D index maths.


@njit(nogil=True, cache=True, error_model="numpy")
def _brightness(x: np.ndarray, f: np.float32) -> None:
    """x [3, H, W] *= f, clamped to [0, 1]."""
    for c in range(3):
        for y in range(x.shape[1]):
            row = x[c, y]
            for j in range(row.shape[0]):
                row[j] = _clamp01(row[j] * f)


@njit(nogil=True, cache=True, error_model="numpy")
def _luma(x: np.ndarray, y: int, out: np.ndarray) -> None:
    """out [W] = grayscale of row y of x [3, H, W]."""
    r, g, b = x[0, y], x[1, y], x[2, y]
    for j in range(out.shape[0]):
        out[j] = r[j] * _LUMA[0] + g[j] * _LUMA[1] + b[j] * _LUMA[2]


@njit(nogil=True, cache=True, error_model="numpy")
def _saturation(x: np.ndarray, f: np.float32, luma: np.ndarray) -> None:
    """torchvision's f x + (1 - f) gray, clamped."""
    g = _ONE - f
    for y in range(x.shape[1]):
        _luma(x, y, luma)
        for c in range(3):
            row = x[c, y]
            for j in range(row.shape[0]):
                row[j] = _clamp01(g * luma[j] + row[j] * f)


@njit(nogil=True, cache=True, error_model="numpy", fastmath=True)
def _row_sum(row: np.ndarray) -> np.float32:
    s = _ZERO
    for j in range(row.shape[0]):
        s += row[j]
    return s


@njit(nogil=True, cache=True, error_model="numpy")
def _contrast(x: np.ndarray, f: np.float32) -> None:
    """Blend with the mean of the grayscale image (mean per channel, then luma, as augment.adjust_contrast)."""
    n = x.shape[1] * x.shape[2]
    mean = _ZERO
    for c in range(3):
        s = 0.0  # float64 over rows, float32 within a row
        for y in range(x.shape[1]):
            s += _row_sum(x[c, y])
        mean += F32(s / n) * _LUMA[c]
    g = (_ONE - f) * mean
    for c in range(3):
        for y in range(x.shape[1]):
            row = x[c, y]
            for j in range(row.shape[0]):
                row[j] = _clamp01(g + row[j] * f)


@njit(nogil=True, cache=True, error_model="numpy")
def _hue(x: np.ndarray, f: np.float32) -> None:
    """HSV hue rotation by f turns, augment.adjust_hue's closed form per pixel, branch-free."""
    for y in range(x.shape[1]):
        r, g, b = x[0, y], x[1, y], x[2, y]
        for j in range(r.shape[0]):
            rj, gj, bj = r[j], g[j], b[j]
            maxc = max(rj, max(gj, bj))
            chroma = maxc - min(rj, min(gj, bj))
            hc_g = bj - rj + _TWO * chroma
            hc_b = rj - gj + _FOUR * chroma
            hc = gj - bj if rj == maxc else (hc_g if gj == maxc else hc_b)  # ties pick r, then g
            turns = hc / (max(chroma, _EPS) * _SIX) + f
            k = turns + _HUE_OFFSETS[0]
            k = (k - np.floor(k)) * _SIX  # k > 0: floor = trunc (torch's frac)
            r[j] = maxc - _clamp01(_TWO - abs(k - _TWO)) * chroma
            k = turns + _HUE_OFFSETS[1]
            k = (k - np.floor(k)) * _SIX
            g[j] = maxc - _clamp01(_TWO - abs(k - _TWO)) * chroma
            k = turns + _HUE_OFFSETS[2]
            k = (k - np.floor(k)) * _SIX
            b[j] = maxc - _clamp01(_TWO - abs(k - _TWO)) * chroma


@njit(nogil=True, cache=True, error_model="numpy")
def _gray(x: np.ndarray, luma: np.ndarray) -> None:
    for y in range(x.shape[1]):
        _luma(x, y, luma)
        for c in range(3):
            row = x[c, y]
            for j in range(row.shape[0]):
                row[j] = luma[j]


@njit(nogil=True, cache=True, error_model="numpy")
def _reflect(i: int, n: int) -> int:
    """Index into [0, n) with reflect padding (the edge sample is not repeated)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


@njit(nogil=True, cache=True, error_model="numpy")
def _blur(x: np.ndarray, taps: np.ndarray, rows: np.ndarray, pad: np.ndarray) -> None:
    """Separable blur of x [3, H, W] in place (reflect padding): horizontal into rows [3, H, W], vertical
    back into x; each pass sums the taps in augment.gaussian_blur's order.

    Taps below _TAP_MIN are skipped: they change no result by more than ~1e-6 (all of them together), and
    multiplying by them made denormal floats, 100x slower per multiply; a small sigma then costs a few taps
    instead of K. Inner loops index with the bare loop counter or an unsigned offset: numba adds a
    negative-index wrap-around to any other signed index, and that stops LLVM from vectorising the loop."""
    K, height, width = taps.shape[0], x.shape[1], x.shape[2]
    p = K // 2
    lo = 0
    while lo < p and taps[lo] < _TAP_MIN and taps[K - 1 - lo] < _TAP_MIN:
        lo += 1
    hi = K - lo  # taps[lo:hi] are used (a Gaussian's taps are symmetric)
    for c in range(3):
        for y in range(height):
            for q in range(width + 2 * p):
                pad[q] = x[c, y, _reflect(q - p, width)]
            k0, u0 = taps[lo], np.uint64(lo)
            for j in range(width):
                rows[c, y, j] = pad[np.uint64(j) + u0] * k0
            for t in range(lo + 1, hi):
                k, ut = taps[t], np.uint64(t)
                for j in range(width):
                    rows[c, y, j] += pad[np.uint64(j) + ut] * k
        for y in range(height):
            r, k0 = _reflect(y + lo - p, height), taps[lo]
            for j in range(width):
                x[c, y, j] = rows[c, r, j] * k0
            for t in range(lo + 1, hi):
                r, k = _reflect(y + t - p, height), taps[t]
                for j in range(width):
                    x[c, y, j] += rows[c, r, j] * k


@njit(nogil=True, cache=True, error_model="numpy")
def augment_views(images: np.ndarray, jitter: np.ndarray, factors: np.ndarray, order: np.ndarray,
                  gray: np.ndarray, blur: np.ndarray, taps: np.ndarray, flip: np.ndarray, mean: np.ndarray,
                  std: np.ndarray, out: np.ndarray) -> None:
    """aug+ after the crop for a slice of one view, MoCo's order: ColorJitter in the drawn order, grayscale,
    blur, flip, then (x - mean) / std.

    images uint8 [b, H, W, 3]; jitter, gray, blur, flip bool [b]; factors float32 [b, 4] (brightness,
    contrast, saturation, hue); order int64 [b, 4] (op id applied k-th); taps float32 [b, K]; mean, std
    float32 [3]; out float32 [b, 3, H, W].
    """
    b, height, width, _ = images.shape
    x = np.empty((3, height, width), dtype=np.float32)
    rows = np.empty((3, height, width), dtype=np.float32)
    luma = np.empty(width, dtype=np.float32)
    pad = np.empty(width + taps.shape[1], dtype=np.float32)
    # one input row, contiguous (images is a strided view), as float32 (the values are exact): a uint8 scratch
    # array here failed numba's typing as read-only after an in-process ffcv pretraining run with a cold
    # cache (tests test_anatomy then test_augment; cause inside numba not found); float32 scratch does not
    line = np.empty(3 * width, dtype=np.float32)
    for i in range(b):
        for y in range(height):
            src = images[i, y]
            for j in range(width):
                for c in range(3):
                    line[3 * j + c] = F32(src[j, c])
            r, g, bl = x[0, y], x[1, y], x[2, y]
            for j in range(width):
                u = np.uint64(3 * j)
                r[j] = line[u] / _U8
                g[j] = line[u + np.uint64(1)] / _U8
                bl[j] = line[u + np.uint64(2)] / _U8
        if jitter[i]:
            for k in range(4):
                op = order[i, k]
                f = factors[i, op]
                if op == 0:
                    _brightness(x, f)
                elif op == 1:
                    _contrast(x, f)
                elif op == 2:
                    _saturation(x, f, luma)
                else:
                    _hue(x, f)
        if gray[i]:
            _gray(x, luma)
        if blur[i]:
            _blur(x, taps[i], rows, pad)
        for c in range(3):
            m, s = mean[c], std[c]
            for y in range(height):
                src, dst = x[c, y], out[i, c, y]
                if flip[i]:
                    last = np.uint64(width - 1)
                    for j in range(width):
                        dst[j] = (src[last - np.uint64(j)] - m) / s
                else:
                    for j in range(width):
                        dst[j] = (src[j] - m) / s
