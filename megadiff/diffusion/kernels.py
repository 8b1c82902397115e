"""CPU kernels of the sampler: row maxima, in-place softmax, top-k / top-p filtering, inverse-CDF
search, per-sample uniforms, and a 2-D row view of strided logits.

Each computes what its docstring defines (the tests check them against the plain torch
definitions) by a route that is fast on CPU: numpy's selection and sort instead of ``topk`` and
``torch.sort``, fast reductions instead of ``max`` with indices, two-level sums instead of a
float64 cumsum over every column, results written over their input where that avoids fresh pages.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def filter_logits(
    logits: Tensor, top_k: int = 0, top_p: float = 1.0, inplace: bool = False
) -> Tensor:
    """-inf outside the top-k logits and outside the nucleus (the most probable tokens down to
    the first at which their cumulative probability reaches ``top_p``); ties with the last kept
    token are kept. CPU tensors of finite or -inf logits; ``inplace`` fills ``logits`` itself."""
    k_on, p_on = 0 < top_k < logits.shape[-1], top_p < 1.0
    if (k_on or p_on) and not inplace:
        logits = logits.clone()
    if k_on:
        fill_neg_inf_(logits, logits < kth_largest(logits, top_k))
    if p_on:
        fill_neg_inf_(logits, outside_nucleus(logits.softmax(-1), top_p))
    return logits


def fill_neg_inf_(x: Tensor, mask: Tensor) -> Tensor:
    """``x.masked_fill_(mask, -inf)`` for finite or -inf ``x``, branch-free: ``masked_fill_``
    branches per element and runs ~7x slower on masks that are neither mostly True nor mostly
    False (a nucleus over a flat distribution); subtracting the dtype's largest value twice
    overflows exactly the masked elements to -inf and leaves the others bit-identical."""
    big = torch.finfo(x.dtype).max
    return x.add_(mask, alpha=-big).add_(mask, alpha=-big)


def softmax_(x: Tensor) -> Tensor:
    """``x.softmax(-1)`` written over ``x`` if contiguous: no new tensor, whose fresh pages (a
    few MB per step) cost the CPU sampler more than the softmax itself. (The kernel maps each
    row onto itself; a strided ``out`` would be computed elsewhere and copied over ``x``
    while being read: not done.)"""
    if not x.is_contiguous():
        return x.softmax(-1)
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def kth_largest(x: Tensor, k: int) -> Tensor:
    """``[..., 1]`` the ``k``-th largest value of each row (numpy's selection: an order of
    magnitude faster than ``topk`` on CPU)."""
    a = _as_numpy(x)
    n = a.shape[-1]
    return torch.from_numpy(np.partition(a, n - k, axis=-1)[..., n - k : n - k + 1])


def _as_numpy(x: Tensor) -> np.ndarray:
    """A numpy view of a CPU float tensor (bfloat16/float16 widened to float32)."""
    return (x if x.dtype in (torch.float32, torch.float64) else x.float()).contiguous().numpy()


def outside_nucleus(prob: Tensor, top_p: float) -> Tensor:
    """Mask of the tokens outside the nucleus: the smallest set of most probable tokens with
    probability >= ``top_p`` per row of ``prob`` (ties with its least probable member inside;
    zero-probability tokens never).

    A row whose maximum reaches ``top_p`` keeps its maximum; the others' values are sorted
    (numpy's vectorized sort: ~10x faster than ``torch.sort`` on CPU, and about as fast as a
    partial selection of the largest few, which would not settle a flat row anyway).
    """
    n = prob.shape[-1]
    p = _as_numpy(prob.reshape(-1, n))
    pmax = p.max(-1)
    lowest = pmax.copy()  # the least probable kept token, per row
    rest = np.flatnonzero(pmax < top_p)
    if len(rest):
        asc = np.sort(p if 2 * len(rest) > len(p) else p[rest], axis=-1)  # no copy if most
        _nucleus_edge(asc[rest] if len(asc) > len(rest) else asc, top_p, lowest, rest)
    lowest = np.maximum(lowest, np.finfo(lowest.dtype).tiny)  # never a token of probability 0
    return prob < torch.from_numpy(lowest).view(*prob.shape[:-1], 1)


def _nucleus_edge(
    asc: np.ndarray, top_p: float, lowest: np.ndarray, rows: np.ndarray, chunk: int = 32
) -> np.ndarray:
    """``lowest[rows]`` = the value in each row of ``asc`` (ascending) at which the sum of the
    values from the largest down first reaches ``top_p``; returns the rows where it does (the
    smallest value for the others).

    Wide rows sum in two levels, as in :func:`inverse_cdf`: chunk sums (one read of ``asc``,
    in its precision), their running total from the top in float64, then the chosen chunk's
    values one by one in float64 — instead of a float64 cumsum over every column. Rows where
    that sum comes within 1e-5 of ``top_p`` (where the chunk sums' rounding could move the
    edge) are redone with the float64 cumsum, so the result is that of the exact sum.
    """
    r, n = asc.shape
    if n <= 4 * chunk:  # narrow rows: the exact sum is cheaper than two levels
        return _exact_nucleus_edge(asc, top_p, lowest, rows)
    a = torch.from_numpy(asc)
    pad = -n % chunk  # virtual zeros before the first (smallest) value
    nb = (n + pad) // chunk
    sums = a[:, chunk - pad :].unflatten(-1, (-1, chunk)).sum(-1)
    sums = torch.cat([a[:, : chunk - pad].sum(-1, keepdim=True), sums], -1)  # [r, nb]
    from_top = sums.flip(-1).double().cumsum(-1)
    ok = (from_top[:, -1] >= top_p).numpy()
    c = torch.searchsorted(from_top, torch.full((r, 1), top_p, dtype=torch.float64))
    c = c.clamp_(max=nb - 1)  # [r, 1] chunks from the top before the edge's
    before = torch.where(c > 0, from_top.gather(-1, (c - 1).clamp(min=0)), 0.0)
    cols = (nb - c) * chunk - pad - 1 - torch.arange(chunk)  # the chunk, from its largest
    vals = a.gather(-1, cols.clamp(min=0)) * (cols >= 0)
    inner = before + vals.double().cumsum(-1)
    j = torch.searchsorted(inner, torch.full((r, 1), top_p, dtype=torch.float64))
    edge = cols.gather(-1, j.clamp_(max=chunk - 1)).clamp_(min=0).squeeze(-1).numpy()
    lowest[rows] = asc[np.arange(r), np.where(ok, edge, 0)]
    # rows whose running sum passes within the chunk sums' rounding of top_p (a few in 10^4)
    near = ((inner - top_p).abs() < 1e-5).any(-1) | ((from_top - top_p).abs() < 1e-5).any(-1)
    if bool(near.any()):
        sel = near.nonzero().squeeze(-1).numpy()
        ok[sel] = _exact_nucleus_edge(asc[sel], top_p, lowest, rows[sel])
    return ok


def _exact_nucleus_edge(
    asc: np.ndarray, top_p: float, lowest: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """:func:`_nucleus_edge` by a float64 cumsum over each whole row (from the largest)."""
    desc = asc[:, ::-1].copy()
    hit = (torch.from_numpy(desc).cumsum(-1, dtype=torch.float64) >= top_p).numpy()
    ok = hit[:, -1]
    lowest[rows] = desc[np.arange(len(desc)), np.where(ok, hit.argmax(-1), desc.shape[1] - 1)]
    return ok


def row_max(x: Tensor, classes: int = 32) -> tuple[Tensor, Tensor]:
    """``x.max(-1)`` (values, first index of the maximum) at a fraction of its CPU cost.

    ``max`` with indices is a slow reduction on CPU; ``amax`` over the leading axis of a
    ``[classes, n / classes]`` view of each row is a fast one. The maximum's class comes from
    that, its row within the class from a gather; rows whose maximum occurs in two classes
    (ties) take ``max`` itself, so the first index is returned exactly as ``max`` does.
    """
    n = x.shape[-1]
    width = n // classes
    if width < 8:
        return x.max(-1)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    m = width * classes
    grid = x2[:, :m].unflatten(-1, (classes, width))  # grid[b, r, c] = x2[b, r * width + c]
    cmax = grid.amax(1)  # [N, width]
    val = cmax.amax(-1, keepdim=True)
    hit = cmax == val
    c = hit.to(torch.uint8).argmax(-1, keepdim=True)  # the first class holding the maximum
    col = grid.gather(2, c[:, None, :].expand(-1, classes, 1)).squeeze(-1)  # [N, classes]
    idx = (col == val).to(torch.uint8).argmax(-1, keepdim=True) * width + c
    if m < n:  # the last n - m columns
        tv, ti = x2[:, m:].max(-1, keepdim=True)
        later = tv > val
        val, idx = torch.where(later, tv, val), torch.where(later, ti + m, idx)
        hit = hit & ~later
    val, idx = val.squeeze(-1), idx.squeeze(-1)
    tie = (hit.sum(-1) > 1).nonzero(as_tuple=True)[0]
    if len(tie):
        val[tie], idx[tie] = x2[tie].max(-1)
    return val.view(lead), idx.view(lead)


def row_view(logits: Tensor) -> tuple[Tensor, int, int]:
    """``logits`` ``[B, L, V]`` as a 2-D ``[rows, V]`` view plus the row steps of its first two
    axes (row of ``[b, l]`` = ``b * step_b + l * step_l``), without the full copy ``reshape``
    makes of a non-contiguous tensor (megatron's ``[s, b, V]`` transposed to ``[b, s, V]``)."""
    B, L, V = logits.shape
    s0, s1, s2 = logits.stride()
    g = math.gcd(s0, s1)
    if s2 != 1 or g < V:  # rows would overlap: one copy
        logits = logits.contiguous()
        s0, s1, g = L * V, V, V
    n = (B - 1) * (s0 // g) + (L - 1) * (s1 // g) + 1
    return logits.as_strided((n, V), (g, 1)), s0 // g, s1 // g


def inverse_cdf(w: Tensor, u: Tensor, chunk: int = 32) -> Tensor:
    """Column ``j`` with ``cdf[j-1] <= u * total < cdf[j]`` of weights ``w`` ``[..., n]`` (>= 0).

    The CDF is accumulated in two levels (chunk sums, then the chosen chunk's columns), which
    reads ``w`` once instead of a float64 cumsum over every column; the running sums are
    float64, the sums inside a chunk in ``w``'s precision (a boundary may move by ~1e-7 of a
    chunk's mass). A column of weight 0 is never returned.
    """
    n = w.shape[-1]
    if n <= 2 * chunk:
        cdf = w.cumsum(-1, dtype=torch.float64)
        v = (u * cdf[..., -1]).unsqueeze(-1)
        return _clamp_overflow(torch.searchsorted(cdf, v, right=True), w).squeeze(-1)
    m = n // chunk * chunk
    # chunk sums in w's precision (a float64 sum would first copy all of w to float64), the
    # running total over chunks and inside the chosen chunk in float64
    sums = w[..., :m].unflatten(-1, (-1, chunk)).sum(-1)
    if m < n:
        sums = torch.cat([sums, w[..., m:].sum(-1, keepdim=True)], -1)
    cdf = sums.double().cumsum(-1)
    v = (u * cdf[..., -1]).unsqueeze(-1)
    blk = torch.searchsorted(cdf, v, right=True).clamp_(max=cdf.shape[-1] - 1)  # [..., 1]
    before = torch.where(blk > 0, cdf.gather(-1, (blk - 1).clamp(min=0)), 0.0)
    cols = blk * chunk + torch.arange(chunk)
    inside = w.gather(-1, cols.clamp(max=n - 1)) * (cols < n)
    j = torch.searchsorted(inside.cumsum(-1, dtype=torch.float64), v - before, right=True)
    return (blk * chunk + _clamp_overflow(j, inside)).squeeze(-1)


def _clamp_overflow(j: Tensor, w: Tensor) -> Tensor:
    """Draws past the last column (float64 rounding at the end of the CDF) moved to the last
    column of positive weight; a search never stops on a zero-weight column otherwise."""
    if bool((j >= w.shape[-1]).any()):
        j = torch.minimum(j, _last_positive(w))
    return j


def _last_positive(w: Tensor) -> Tensor:
    """``[..., 1]`` index of the last column with weight > 0 (0 for a row with none: the
    padding slots of a compacted candidate batch, whose draw is never used)."""
    return (((w > 0) * torch.arange(1, w.shape[-1] + 1)).amax(-1, keepdim=True) - 1).clamp_(min=0)


def uniforms(counts: Tensor, k: int, generators: list[torch.Generator]) -> Tensor:
    """``[k, Ba, NC]`` float64 uniforms: sample r draws ``k * counts[r]`` from its own
    generator (zeros past its count)."""
    u = torch.zeros(k, len(generators), int(counts.max()), dtype=torch.float64)
    for r, (gen, n) in enumerate(zip(generators, counts.tolist())):
        for i in range(k):  # in place; the same stream as one rand(k, n)
            torch.rand(n, generator=gen, out=u[i, r, :n])
    return u
