"""Contrastive losses: MBCL (open_clip's ClipLoss) and the SogCLR surrogates GCL / HGCL.

The global surrogates follow the TuneCLIP paper (eqs. 2-4, 8, 9). Notation: a global batch of
B pairs, image features f_i and text features g_j (L2-normalised), s_ij = f_i . g_j.

  Phi1_i = 1/B sum_{j != i} exp(l(s_ij - s_ii) / tau)      (image anchor i)
  Phi2_i = 1/B sum_{j != i} exp(l(s_ji - s_ii) / tau)      (text anchor i)
  G      = tau/B sum_i [grad Phi1_i / (eps + u_x[i]) + grad Phi2_i / (eps + u_z[i])]

The divisor is the global batch size B (the paper's choice) for both Phi and G.

Nothing here ever forms exp(l / tau): Phi is kept as log Phi (log-sum-exp), the normaliser u
as log u, and the gradient weights exp(l/tau - log(eps + u)) are bounded by B / gamma. The
feature gradients are computed in closed form, chunk by chunk over the global batch, so peak
memory is O(local batch x chunk); the encoders' backward then receives them through a scalar
whose gradient is exactly G (`GlobalContrastiveLoss.forward`).

Cost (benchmarks/loss_speed.py): the floor is three B x D x B products, the similarities s and
the two feature gradients. In one process s_ji = (s^T)_ij, so each chunk's block s = f @ g_chunk^T
serves both anchor directions (image anchors along its rows, the chunk's text anchors along its
columns), for log Phi and again for the gradient coefficients, and one block M = A + C^T gives
both df = M @ g_chunk and dg_chunk = M^T @ f. log Phi has to be complete before the normaliser
updates u, and u weights the gradient, so the gradient pass recomputes the chunk's block (four
products in all), except when the batch is one chunk: then the log Phi pass keeps its terms
exp(l/tau - shift) l' (two B x B blocks, the size of s itself) and the gradient pass rescales them
per anchor by exp(shift - log(eps + u)) (three products). Ranks (local rows against gathered
columns) need one block per direction; a one-chunk batch keeps both. The elementwise work runs
in place in a few reused blocks (`_Workspace`).

Distribution: each rank passes its local features (with grad) plus the gathered global
features (no grad) and the gathered log(eps + u) of every anchor. Local results depend on the
global batch only through those arguments, so one process with offset 0 and local == global
is the single-process computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from open_clip.loss import ClipLoss
from torch import Tensor

from engine.objectives.block_kernels import BlockKernels
from engine.objectives.normaliser import update_log_estimate  # SogCLR's moving average: the table's rule

SURROGATES = ("gcl", "hgcl")


def pairwise_surrogate(d: Tensor, *, kind: str, margin: float) -> Tensor:
    """l(d): GCL l(d) = d; HGCL l(d) = max(d + m, 0)^2 (paper eq. 8)."""
    if kind == "gcl":
        return d
    if kind == "hgcl":
        return torch.clamp(d + margin, min=0.0).square()
    raise ValueError(f"unknown surrogate {kind!r}; expected one of {SURROGATES}")


@dataclass(frozen=True)
class SurrogateSpec:
    """Which pairwise surrogate, its margin, the fixed temperature and eps of log(eps + u)."""

    kind: str = "hgcl"
    margin: float = 0.1
    tau: float = 0.01
    eps: float = 1e-14
    chunk_size: int = 0  # columns of the global batch per block; 0 = the whole batch

    def __post_init__(self) -> None:
        if self.kind not in SURROGATES:
            raise ValueError(f"surrogate kind {self.kind!r} unknown; use one of {SURROGATES}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """Loss math runs in float32 at least (bf16/fp16 features), float64 when given."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def _chunks(total: int, chunk_size: int):
    step = total if chunk_size <= 0 else chunk_size
    for start in range(0, total, step):
        yield start, min(start + step, total)


def _positives(block: Tensor, first_row: int, first_column: int) -> Tensor:
    """View of the positive pairs (global row index == global column index) of a block whose rows
    start at global index `first_row` and columns at `first_column` (empty where none lie in it)."""
    return torch.diagonal(block, first_row - first_column)


def _off_positive_max(s: Tensor, first_row: int, first_column: int, *, columns: bool) -> tuple[Tensor, Tensor | None]:
    """Row maxima (and column maxima with `columns`) of a similarity block without its positive pairs."""
    positives = _positives(s, first_row, first_column)
    saved = positives.clone()
    positives.fill_(-math.inf)
    row_max = s.amax(dim=1, keepdim=True)
    column_max = s.amax(dim=0, keepdim=True) if columns else None
    positives.copy_(saved)
    return row_max, column_max


def _shift(max_s: Tensor, pos: Tensor, spec: SurrogateSpec) -> Tensor:
    """The largest exponent l(s - pos)/tau of each row or column (l is non-decreasing, so it is l(max s - pos)/tau),
    0 where the block holds none: exp(exponent - shift) <= 1 never overflows, and the largest term is 1."""
    shift = pairwise_surrogate(max_s - pos, kind=spec.kind, margin=spec.margin) / spec.tau
    return torch.where(max_s == -math.inf, 0.0, shift)


class _Workspace:
    """The [rows, chunk] blocks of one loss call, reused from chunk to chunk: the elementwise passes write into
    them instead of into new tensors (a fresh block is page-faulted in on first touch, on CPU about the cost of
    two passes over it)."""

    def __init__(self, rows: int, like: Tensor):
        self.rows, self.like = rows, like
        self._blocks: dict[str, Tensor] = {}

    def __call__(self, name: str, columns: int) -> Tensor:
        block = self._blocks.get(name)
        if block is None or block.shape[1] != columns:
            block = self._blocks[name] = self.like.new_empty((self.rows, columns))
        return block


def _exp_terms(s: Tensor, pos: Tensor, shift: Tensor, spec: SurrogateSpec, *, into: Tensor,
               exp_into: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """e = exp(l(s - pos)/tau - shift) over a similarity block, and HGCL's hinge h = max(s - pos + m, 0)
    (l = h^2, l' = 2h; None for GCL, where l' = 1); `pos`, `shift` broadcast along rows or columns.

    Four elementwise passes for HGCL, three for GCL, written into `into` (which may be `s`). HGCL writes e
    into `exp_into` and keeps h in `into`; without `exp_into`, e overwrites h (returned as None).
    """
    inv_tau = 1.0 / spec.tau
    if spec.kind == "gcl":
        d = torch.sub(s, pos, out=into)
        return torch.add(-shift, d, alpha=inv_tau, out=d).exp_(), None
    hinge = torch.sub(s, pos - spec.margin, out=into).clamp_(min=0.0)
    e = torch.addcmul(-shift, hinge, hinge, value=inv_tau, out=hinge if exp_into is None else exp_into).exp_()
    return e, (None if exp_into is None else hinge)


def _log_sum(e: Tensor, shift: Tensor, positives: Tensor, *, dim: int) -> Tensor:
    """log of the sums of `e` along `dim` without the positive pairs (zeroed in `e`), plus `shift`."""
    positives.zero_()
    return e.sum(dim=dim).log_() + shift.squeeze(dim)


def _coefficients(s: Tensor, pos: Tensor, log_w: Tensor, first_row: int, first_column: int, spec: SurrogateSpec,
                  *, into: Tensor, spare: Tensor) -> Tensor:
    """exp(l(d)/tau - log w) * l'(d) / (2 for HGCL), d = s - pos, zero on the positive pairs; in `into` (GCL)
    or `spare` (HGCL, whose hinge is left in `into`, which may be `s`)."""
    e, hinge = _exp_terms(s, pos, log_w, spec, into=into, exp_into=spare)
    if hinge is not None:
        e.mul_(hinge)
    _positives(e, first_row, first_column).zero_()
    return e


class _Kept:
    """What the log Phi pass keeps for the gradient pass when the global batch is one block; handed out once
    (`take`), so a second gradient pass on the same estimates recomputes instead of reading consumed blocks."""

    def __init__(self, blocks: tuple[Tensor, ...]):
        self._blocks: tuple[Tensor, ...] | None = blocks

    def take(self) -> tuple[Tensor, ...] | None:
        blocks, self._blocks = self._blocks, None
        return blocks


def _is_whole_batch(f_local: Tensor, g_local: Tensor, f_global: Tensor, g_global: Tensor) -> bool:
    """One process: the local rows are the global batch, so s_gf = s_fg^T and one block serves both anchors."""
    return _same_values(f_local, f_global) and _same_values(g_local, g_global)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """`a` and `b` hold the same values; a view of the same memory is recognised without reading it."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)


def _log_phi(f_local: Tensor, g_local: Tensor, f_global: Tensor, g_global: Tensor, *, offset: int,
             spec: SurrogateSpec, keep: bool, kernels: BlockKernels | None = None) -> tuple[Tensor, Tensor, _Kept | None]:
    """log Phi1, log Phi2 of the local anchors (see `anchor_log_phi`), and with `keep`, when the global
    batch is one block, what the gradient pass can reuse instead of recomputing it. `kernels`: each block's
    elementwise work compiled (engine/objectives/block_kernels.py); None: eager, in place."""
    f_local, g_local, f_global, g_global = _upcast(f_local, g_local, f_global, g_global)
    num_global = f_global.shape[0]
    pos = (f_local * g_local).sum(dim=1, keepdim=True)  # s_ii of the local anchors
    keep = keep and num_global <= (spec.chunk_size or num_global)
    if _is_whole_batch(f_local, g_local, f_global, g_global):
        log_phi_x, log_phi_z, kept = _whole_batch_log_phi(f_local, g_local, pos, spec, keep=keep, kernels=kernels)
    else:
        log_phi_x, log_phi_z, kept = _rank_log_phi(f_local, g_local, f_global, g_global, pos, offset=offset,
                                                   spec=spec, keep=keep, kernels=kernels)
    log_b = math.log(num_global)
    return log_phi_x - log_b, log_phi_z - log_b, (_Kept(kept) if kept is not None else None)


def _whole_batch_log_phi(f: Tensor, g: Tensor, pos: Tensor, spec: SurrogateSpec, *, keep: bool,
                         kernels: BlockKernels | None):
    """One process: per chunk of texts, one block s = f @ g_chunk^T gives the image anchors' partial sums
    along its rows and the chunk's text anchors' whole sums along its columns (s_ji = s^T)."""
    num = f.shape[0]
    row_parts, log_phi_z, kept = [], torch.empty(num, dtype=f.dtype, device=f.device), None
    work = _Workspace(num, f)
    for start, stop in _chunks(num, spec.chunk_size):
        s = torch.mm(f, g[start:stop].T, out=work("s", stop - start))  # image anchor a (row) vs text k (column)
        pos_column = pos[start:stop].T
        if kernels is not None:
            row_part, log_phi_z[start:stop], kept = kernels.whole_log_phi_block(
                s, pos, pos_column, -start, spec.kind, spec.margin, spec.tau, keep)
            row_parts.append(row_part)
            continue
        row_max, column_max = _off_positive_max(s, 0, start, columns=True)
        shift_row, shift_column = _shift(row_max, pos, spec), _shift(column_max, pos_column, spec)
        # Kept, the terms need their own memory: exp(l/tau - shift) times the hinge, in new blocks.
        # Kept, the gradient's coefficients are these terms exp(l/tau - shift) times l' (HGCL: the hinge, which
        # needs a block of its own meanwhile) and a factor per anchor.
        spare = torch.empty_like(s) if keep and spec.kind == "hgcl" else None
        e_row, hinge_row = _exp_terms(s, pos, shift_row, spec, into=work("rows", stop - start), exp_into=spare)
        row_parts.append(_log_sum(e_row, shift_row, _positives(e_row, 0, start), dim=1))
        if hinge_row is not None:
            e_row = torch.mul(e_row, hinge_row, out=hinge_row)
        e_column, hinge_column = _exp_terms(s, pos_column, shift_column, spec, into=s, exp_into=spare)
        log_phi_z[start:stop] = _log_sum(e_column, shift_column, _positives(e_column, 0, start), dim=0)
        if hinge_column is not None:
            e_column = torch.mul(e_column, hinge_column, out=hinge_column)
        if keep:
            kept = (e_row, shift_row, e_column, shift_column)
    return torch.logsumexp(torch.stack(row_parts, dim=1), dim=1), log_phi_z, kept


def _rank_log_phi(f_local: Tensor, g_local: Tensor, f_global: Tensor, g_global: Tensor, pos: Tensor, *,
                  offset: int, spec: SurrogateSpec, keep: bool, kernels: BlockKernels | None):
    """Local anchors against the gathered global batch: one block per anchor direction and chunk."""
    parts_x, parts_z, kept = [], [], None
    work = _Workspace(f_local.shape[0], f_local)
    for start, stop in _chunks(f_global.shape[0], spec.chunk_size):
        s_img = f_local @ g_global[start:stop].T  # s_{a,k}: local image anchor a, text k
        s_txt = g_local @ f_global[start:stop].T  # s_{k,b}: local text anchor b, image k
        for s, parts in ((s_img, parts_x), (s_txt, parts_z)):
            if kernels is not None:
                parts.append(kernels.rank_log_phi_block(s, pos, offset - start, spec.kind, spec.margin, spec.tau))
                continue
            row_max, _ = _off_positive_max(s, offset, start, columns=False)
            shift = _shift(row_max, pos, spec)
            e, _ = _exp_terms(s, pos, shift, spec, into=work("rows", stop - start) if keep else s)
            parts.append(_log_sum(e, shift, _positives(e, offset, start), dim=1))
        if keep:
            kept = (s_img, s_txt)
    log_phi_x = torch.logsumexp(torch.stack(parts_x, dim=1), dim=1)
    log_phi_z = torch.logsumexp(torch.stack(parts_z, dim=1), dim=1)
    return log_phi_x, log_phi_z, kept


def anchor_log_phi(
    f_local: Tensor,
    g_local: Tensor,
    f_global: Tensor,
    g_global: Tensor,
    *,
    offset: int,
    spec: SurrogateSpec,
) -> tuple[Tensor, Tensor]:
    """log Phi1, log Phi2 (paper eq. 8) of the local anchors against the global batch, shape [b].

    `offset` is the global index of the first local sample. No gradient is recorded.
    """
    with torch.no_grad():
        log_phi_x, log_phi_z, _ = _log_phi(f_local, g_local, f_global, g_global, offset=offset, spec=spec, keep=False)
    return log_phi_x, log_phi_z


def feature_gradients(
    f_local: Tensor,
    g_local: Tensor,
    f_global: Tensor,
    g_global: Tensor,
    log_wx_global: Tensor,
    log_wz_global: Tensor,
    *,
    offset: int,
    spec: SurrogateSpec,
    kept: _Kept | None = None,
    kernels: BlockKernels | None = None,
) -> tuple[Tensor, Tensor]:
    """dG/df, dG/dg for the local features: the paper's estimator G (eq. 4) in closed form.

    `log_wx_global`, `log_wz_global` are log(eps + u) of every anchor of the global batch
    ([B], after this step's update). Returns float32 tensors shaped like f_local, g_local.
    `kept`: the blocks the log Phi pass of the same features kept (`_log_phi`), else recomputed; `kernels` as
    in `_log_phi`.

    With coefficients A_ik (image anchor i vs text k) and C_ik (text anchor i vs image k),
    c = exp(l/tau - log(eps+u_i)) * l'(d) / B^2, the gradients are
      df_a = sum_k (A_ak + C_ka) g_k - (sum_k A_ak + C_ak) g_a
      dg_b = sum_k (A_kb + C_bk) f_k - (sum_k A_bk + C_bk) f_b
    and every block needs only local rows against a chunk of global columns.
    """
    with torch.no_grad():
        f_local, g_local, f_global, g_global = _upcast(f_local, g_local, f_global, g_global)
        log_wx_global, log_wz_global = log_wx_global.to(f_local.dtype), log_wz_global.to(f_local.dtype)
        blocks = kept.take() if kept is not None else None
        if _is_whole_batch(f_local, g_local, f_global, g_global):
            return _whole_batch_gradients(f_local, g_local, log_wx_global, log_wz_global, spec=spec, kept=blocks,
                                          kernels=kernels)
        return _rank_gradients(f_local, g_local, f_global, g_global, log_wx_global, log_wz_global, offset=offset,
                               spec=spec, kept=blocks, kernels=kernels)


def _gradient_scale(num_global: int, spec: SurrogateSpec) -> float:
    """1/B^2, times HGCL's 2 of l'(d) = 2h, which `_coefficients` leaves out."""
    return (2.0 if spec.kind == "hgcl" else 1.0) / (num_global * num_global)


def _whole_batch_gradients(f: Tensor, g: Tensor, log_wx: Tensor, log_wz: Tensor, *, spec: SurrogateSpec,
                           kept: tuple[Tensor, ...] | None, kernels: BlockKernels | None) -> tuple[Tensor, Tensor]:
    """One process: per chunk of texts k, the block M = A[:, k] + C[k, :]^T (both from s = f @ g_k^T) gives
    df += M @ g_k and the chunk's whole dg_k = M^T @ f."""
    num = f.shape[0]
    scale = _gradient_scale(num, spec)
    pos = (f * g).sum(dim=1, keepdim=True)
    grad_f, grad_g = torch.zeros_like(f), torch.empty_like(g)
    row_sum = torch.zeros_like(pos)  # sum_k A_ak + C_ak
    work = _Workspace(num, f)
    for start, stop in _chunks(num, spec.chunk_size):
        width = stop - start
        if kernels is not None:
            if kept is not None:
                a_rows, shift_row, c_columns, shift_column = kept
                block, rows, columns = kernels.kept_coefficient_block(
                    a_rows, shift_row, c_columns, shift_column, log_wx.unsqueeze(1), log_wz.unsqueeze(0))
            else:
                s = torch.mm(f, g[start:stop].T, out=work("s", width))
                block, rows, columns = kernels.coefficient_block(
                    s, pos, log_wx.unsqueeze(1), pos[start:stop].T, log_wz[start:stop].unsqueeze(0), -start,
                    spec.kind, spec.margin, spec.tau, True)
            row_sum += rows
            row_sum[start:stop] += columns
        elif kept is not None:  # the log Phi pass's terms, exp(l/tau - shift) l', times exp(shift - log w)
            a_rows, shift_row, c_columns, shift_column = kept
            factor_row = (shift_row - log_wx.unsqueeze(1)).exp_()
            factor_column = (shift_column - log_wz.unsqueeze(0)).exp_()
            row_sum += a_rows.sum(dim=1, keepdim=True).mul_(factor_row)
            row_sum[start:stop] += c_columns.sum(dim=0).unsqueeze(1).mul_(factor_column.T)
            block = a_rows.mul_(factor_row).addcmul_(c_columns, factor_column)
        else:
            s = torch.mm(f, g[start:stop].T, out=work("s", width))
            a_rows = _coefficients(s, pos, log_wx.unsqueeze(1), 0, start, spec, into=work("rows", width),
                                   spare=work("spare", width))
            row_sum += a_rows.sum(dim=1, keepdim=True)
            # HGCL's row coefficients are in "spare", its hinge in "rows" is spent; GCL needs no spare.
            c_columns = _coefficients(s, pos[start:stop].T, log_wz[start:stop].unsqueeze(0), 0, start, spec, into=s,
                                      spare=work("rows", width))
            row_sum[start:stop] += c_columns.sum(dim=0).unsqueeze(1)
            block = a_rows.add_(c_columns)
        grad_f.addmm_(block, g[start:stop], alpha=scale)
        torch.mm(block.T, f, out=grad_g[start:stop]).mul_(scale)
    grad_f.addcmul_(row_sum, g, value=-scale)
    grad_g.addcmul_(row_sum, f, value=-scale)
    return grad_f, grad_g


def _rank_gradients(f_local: Tensor, g_local: Tensor, f_global: Tensor, g_global: Tensor, log_wx_global: Tensor,
                    log_wz_global: Tensor, *, offset: int, spec: SurrogateSpec,
                    kept: tuple[Tensor, ...] | None, kernels: BlockKernels | None) -> tuple[Tensor, Tensor]:
    """Local rows against chunks of the gathered batch: per chunk, one block per anchor direction."""
    num_global, num_local = f_global.shape[0], f_local.shape[0]
    scale = _gradient_scale(num_global, spec)
    pos_local = (f_local * g_local).sum(dim=1, keepdim=True)  # [b,1]
    pos_global = (f_global * g_global).sum(dim=1)  # [B]
    lwx_local = log_wx_global[offset : offset + num_local].unsqueeze(1)
    lwz_local = log_wz_global[offset : offset + num_local].unsqueeze(1)
    grad_f = torch.zeros_like(f_local)
    grad_g = torch.zeros_like(g_local)
    row_sum = torch.zeros_like(pos_local)  # sum_k A_ak + C_ak for local a
    work = _Workspace(num_local, f_local)
    for start, stop in _chunks(num_global, spec.chunk_size):
        width = stop - start
        pos_k = pos_global[start:stop].unsqueeze(0)
        g_chunk, f_chunk = g_global[start:stop], f_global[start:stop]
        s_fg, s_gf = kept if kept is not None else (f_local @ g_chunk.T, g_local @ f_chunk.T)
        # s_fg[a, k]: A[a,k] (image anchor a, local, vs text k) and C[k,a] (text anchor k vs image a).
        # s_gf[b, k]: C[b,k] (text anchor b, local, vs image k) and A[k,b] (image anchor k vs text b).
        for s, local_w, column_w, grad, other in ((s_fg, lwx_local, log_wz_global, grad_f, g_chunk),
                                                   (s_gf, lwz_local, log_wx_global, grad_g, f_chunk)):
            if kernels is not None:
                block, rows, _ = kernels.coefficient_block(s, pos_local, local_w, pos_k, column_w[start:stop].unsqueeze(0),
                                                           offset - start, spec.kind, spec.margin, spec.tau, False)
                row_sum += rows
                grad.addmm_(block, other, alpha=scale)
                continue
            rows = _coefficients(s, pos_local, local_w, offset, start, spec, into=work("rows", width),
                                 spare=work("spare", width))
            row_sum += rows.sum(dim=1, keepdim=True)
            columns = _coefficients(s, pos_k, column_w[start:stop].unsqueeze(0), offset, start, spec, into=s,
                                    spare=work("rows", width))  # as in `_whole_batch_gradients`
            grad.addmm_(rows.add_(columns), other, alpha=scale)
        del s_fg, s_gf
    # s_aa enters every term of both of sample a's anchor rows with a minus sign.
    grad_f.addcmul_(row_sum, g_local, value=-scale)
    grad_g.addcmul_(row_sum, f_local, value=-scale)
    return grad_f, grad_g


def log_eps_plus(log_u: Tensor, eps: float) -> Tensor:
    """log(eps + u) from log u, without leaving log space."""
    (log_u,) = _upcast(log_u)
    return torch.logaddexp(log_u, torch.full_like(log_u, math.log(eps)))


Gather = Callable[[Tensor], Tensor]


class BatchEstimates(NamedTuple):
    """What one step's batch gives a normaliser: the gathered global features and the local anchors' log Phi."""

    f_global: Tensor
    g_global: Tensor
    log_phi_x: Tensor
    log_phi_z: Tensor
    kept: _Kept | None = None  # blocks the gradient pass reuses (one block only), consumed by `divided`


def _identity_gather(x: Tensor) -> Tensor:
    return x


class GlobalContrastiveLoss:
    """GCL / HGCL with SogCLR normalisers (paper eqs. 2-4, 8, 9), chunked, distribution-ready.

    `gather` concatenates a tensor over ranks along dim 0 without gradient and `reduce_sum`
    sums over ranks (both identity for one process); `offset` is this rank's first index in the
    global batch. Reported values are global; the objective's gradient, averaged over ranks as
    data-parallel backends do, is G. `kernels`: each block's elementwise work compiled (`run.compile=step`);
    None: eager, in place.
    """

    def __init__(self, spec: SurrogateSpec, *, gather: Gather = _identity_gather,
                 reduce_sum: Gather = _identity_gather, world_size: int = 1, kernels: BlockKernels | None = None):
        self.spec = spec
        self.kernels = kernels
        self.gather = gather
        self.reduce_sum = reduce_sum
        # Backends average parameter gradients over ranks; each rank's objective carries the
        # full G for its own features, so scale by world_size to make the average equal G.
        self.grad_scale = float(world_size)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        *,
        log_u_x: Tensor,
        log_u_z: Tensor,
        seen: Tensor,
        gamma: float,
        offset: int = 0,
        output_dict: bool = False,
    ):
        """Objective whose value is the u-based loss and whose gradient is G (eq. 4), with SogCLR's
        moving average of the given rows (what `TableNormaliser` does, in one call).

        `log_u_x`, `log_u_z`, `seen` are the local anchors' table rows before this step. With
        `output_dict` also returns the updated rows (`log_u_x`, `log_u_z`) for the table, the
        batch-only loss value and the log Phi estimates.
        """
        batch = self.batch_estimates(image_features, text_features, offset=offset)
        new_log_u_x = update_log_estimate(log_u_x, seen, batch.log_phi_x, gamma)
        new_log_u_z = update_log_estimate(log_u_z, seen, batch.log_phi_z, gamma)
        return self.divided(image_features, text_features, batch, log_u_x=new_log_u_x, log_u_z=new_log_u_z,
                            offset=offset, output_dict=output_dict)

    def batch_estimates(self, image_features: Tensor, text_features: Tensor, *, offset: int = 0) -> BatchEstimates:
        """The global batch's features (gathered, no gradient) and log Phi1, log Phi2 of the local anchors."""
        with torch.no_grad():
            f_global = self.gather(image_features.detach())
            g_global = self.gather(text_features.detach())
            log_phi_x, log_phi_z, kept = _log_phi(image_features, text_features, f_global, g_global, offset=offset,
                                                  spec=self.spec, keep=True, kernels=self.kernels)
        return BatchEstimates(f_global, g_global, log_phi_x, log_phi_z, kept)

    def divided(self, image_features: Tensor, text_features: Tensor, batch: BatchEstimates, *, log_u_x: Tensor,
                log_u_z: Tensor, offset: int = 0, output_dict: bool = False):
        """The objective of `forward` for the normaliser's estimates `log_u_x`, `log_u_z` of the local anchors
        (after this step's update): value tau/B sum_i [log(eps + u_x) + log(eps + u_z)], gradient G."""
        spec = self.spec
        f_global, g_global, log_phi_x, log_phi_z = batch.f_global, batch.g_global, batch.log_phi_x, batch.log_phi_z
        num_global = f_global.shape[0]
        log_wx, log_wz = log_eps_plus(log_u_x, spec.eps), log_eps_plus(log_u_z, spec.eps)
        log_wx_global = self.gather(log_wx)
        log_wz_global = self.gather(log_wz)
        grad_f, grad_g = feature_gradients(
            image_features, text_features, f_global, g_global, log_wx_global, log_wz_global,
            offset=offset, spec=spec, kept=batch.kept, kernels=self.kernels,
        )
        # Reported values (eq. 2/9): tau/B sum_i [...], summed over ranks' anchors.
        local_values = torch.stack([
            (log_wx + log_wz).sum(),
            (log_eps_plus(log_phi_x, spec.eps) + log_eps_plus(log_phi_z, spec.eps)).sum(),
        ])
        value, batch_value = (spec.tau / num_global * self.reduce_sum(local_values)).unbind()
        surrogate = (image_features * grad_f.to(image_features.dtype)).sum() + (
            text_features * grad_g.to(text_features.dtype)
        ).sum()
        objective = value.detach() + self.grad_scale * (surrogate - surrogate.detach())
        if not output_dict:
            return objective
        return {
            "loss": objective,
            "loss_value": value.detach(),
            "batch_loss_value": batch_value.detach(),
            "log_u_x": log_u_x,
            "log_u_z": log_u_z,
            "log_phi_x": log_phi_x,
            "log_phi_z": log_phi_z,
        }

    __call__ = forward


class MiniBatchContrastiveLoss:
    """MBCL (paper eq. 1): open_clip's ClipLoss over the global batch, fixed temperature.

    With several ranks it is open_clip's local-loss + gather-with-grad form, whose gradient
    averaged over ranks equals the global-batch gradient.
    """

    def __init__(self, *, tau: float, rank: int = 0, world_size: int = 1, reduce_sum: Gather = _identity_gather):
        self.scale = 1.0 / tau
        self.world_size = world_size
        self.reduce_sum = reduce_sum
        self.clip_loss = ClipLoss(
            local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size
        )

    def forward(self, image_features: Tensor, text_features: Tensor, *, output_dict: bool = False):
        """Symmetric cross-entropy of the batch (mean of the two directions)."""
        scale = torch.tensor(self.scale, dtype=torch.float32, device=image_features.device)
        loss = self.clip_loss(image_features.float(), text_features.float(), scale)
        if output_dict:
            value = self.reduce_sum(loss.detach()) / self.world_size  # ranks hold equal local batches
            return {"loss": loss, "loss_value": value, "batch_loss_value": value}
        return loss

    __call__ = forward
