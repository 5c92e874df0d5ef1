"""GCL / HGCL's elementwise work on one similarity block as pure functions, compiled for `run.compile=step`.

Per chunk the loss does three matrix products and, between them, about a dozen elementwise passes over a
[rows, chunk] block (masked maxima, shifts, exp terms, hinge, positive pairs, sums). Eager, those run in place
in a few reused blocks (engine/objectives/contrastive.py); here each chunk's passes are one function of the
block, with the positive pairs as a mask (column - row == diagonal) instead of a diagonal view written in place,
so torch.compile (inductor) fuses them into a few kernels. The matrix products, the chunk loop, the collectives
and the u table stay eager around these functions.

Each function does the eager path's operations in the same order on the same values, so run without code
generation (torch.compile's `eager` backend) it gives the eager path's numbers bit for bit; inductor's fused
kernels round differently (within about 1e-6 relative in float32).

Shapes vary (the last chunk, a padded tail batch, the diagonal's offset per chunk): dynamo's automatic dynamic
shapes compile a second, shape-generic graph the first time one changes, so a run compiles each function at
most a few times (tests/test_compile.py counts them).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _positive_mask(s: Tensor, diagonal: int) -> Tensor:
    """Where the block's positive pairs lie: column - row == diagonal (first_row - first_column of the block)."""
    rows = torch.arange(s.shape[0], device=s.device).unsqueeze(1)
    columns = torch.arange(s.shape[1], device=s.device).unsqueeze(0)
    return (columns - rows) == diagonal


def _shift(max_s: Tensor, pos: Tensor, kind: str, margin: float, tau: float) -> Tensor:
    """As contrastive._shift: the largest exponent l(max s - pos)/tau, 0 where the block holds none."""
    d = max_s - pos
    shift = (d if kind == "gcl" else torch.clamp(d + margin, min=0.0).square()) / tau
    return torch.where(max_s == -math.inf, 0.0, shift)


def _terms(s: Tensor, pos: Tensor, shift: Tensor, kind: str, margin: float, tau: float) -> tuple[Tensor, Tensor | None]:
    """As contrastive._exp_terms: e = exp(l(s - pos)/tau - shift) and HGCL's hinge (None for GCL)."""
    inv_tau = 1.0 / tau
    if kind == "gcl":
        return torch.add(-shift, s - pos, alpha=inv_tau).exp(), None
    hinge = torch.clamp(s - (pos - margin), min=0.0)
    return torch.addcmul(-shift, hinge, hinge, value=inv_tau).exp(), hinge


def _log_sum(e: Tensor, shift: Tensor, dim: int) -> Tensor:
    return e.sum(dim=dim).log() + shift.squeeze(dim)


def whole_log_phi_block(s: Tensor, pos: Tensor, pos_column: Tensor, diagonal: int, kind: str, margin: float,
                        tau: float, keep: bool):
    """One process's block s = f @ g_chunk^T: the image anchors' partial log sums along its rows, the chunk's text
    anchors' log sums along its columns, and with `keep` the terms exp(l/tau - shift) l' (/2 for HGCL) and shifts
    the gradient pass rescales (as contrastive._whole_batch_log_phi)."""
    mask = _positive_mask(s, diagonal)
    off = torch.where(mask, -math.inf, s)
    shift_row = _shift(off.amax(dim=1, keepdim=True), pos, kind, margin, tau)
    shift_column = _shift(off.amax(dim=0, keepdim=True), pos_column, kind, margin, tau)
    e_row, hinge_row = _terms(s, pos, shift_row, kind, margin, tau)
    e_row = torch.where(mask, 0.0, e_row)
    e_column, hinge_column = _terms(s, pos_column, shift_column, kind, margin, tau)
    e_column = torch.where(mask, 0.0, e_column)
    row_part, column_part = _log_sum(e_row, shift_row, 1), _log_sum(e_column, shift_column, 0)
    if not keep:
        return row_part, column_part, None
    if hinge_row is not None:
        e_row, e_column = e_row * hinge_row, e_column * hinge_column
    return row_part, column_part, (e_row, shift_row, e_column, shift_column)


def rank_log_phi_block(s: Tensor, pos: Tensor, diagonal: int, kind: str, margin: float, tau: float) -> Tensor:
    """Local anchors' rows of one block against a chunk of the gathered batch: their partial log sums."""
    mask = _positive_mask(s, diagonal)
    shift = _shift(torch.where(mask, -math.inf, s).amax(dim=1, keepdim=True), pos, kind, margin, tau)
    e, _ = _terms(s, pos, shift, kind, margin, tau)
    return _log_sum(torch.where(mask, 0.0, e), shift, 1)


def _coefficients(s: Tensor, pos: Tensor, log_w: Tensor, mask: Tensor, kind: str, margin: float,
                  tau: float) -> Tensor:
    """As contrastive._coefficients: exp(l(d)/tau - log w) l'(d) (/2 for HGCL), zero on the positive pairs."""
    e, hinge = _terms(s, pos, log_w, kind, margin, tau)
    if hinge is not None:
        e = e * hinge
    return torch.where(mask, 0.0, e)


def coefficient_block(s: Tensor, pos_row: Tensor, log_w_row: Tensor, pos_column: Tensor, log_w_column: Tensor,
                      diagonal: int, kind: str, margin: float, tau: float, column_sums: bool):
    """The gradient block M = A + C^T of one similarity block (row anchors weighted by `log_w_row`, column anchors
    by `log_w_column`), the row sums of A and, with `column_sums`, the column sums of C^T."""
    mask = _positive_mask(s, diagonal)
    rows = _coefficients(s, pos_row, log_w_row, mask, kind, margin, tau)
    columns = _coefficients(s, pos_column, log_w_column, mask, kind, margin, tau)
    column_sum = columns.sum(dim=0).unsqueeze(1) if column_sums else None
    return rows + columns, rows.sum(dim=1, keepdim=True), column_sum


def kept_coefficient_block(a_rows: Tensor, shift_row: Tensor, c_columns: Tensor, shift_column: Tensor,
                           log_w_row: Tensor, log_w_column: Tensor):
    """A one-block batch's kept terms rescaled per anchor by exp(shift - log w): M, A's row sums, C^T's column
    sums (as the kept branch of contrastive._whole_batch_gradients)."""
    factor_row = (shift_row - log_w_row).exp()
    factor_column = (shift_column - log_w_column).exp()
    row_sum = a_rows.sum(dim=1, keepdim=True) * factor_row
    column_sum = c_columns.sum(dim=0).unsqueeze(1) * factor_column.T
    return torch.addcmul(a_rows * factor_row, c_columns, factor_column), row_sum, column_sum


class BlockKernels:
    """The block functions, each compiled with torch.compile's `backend` (a name, e.g. inductor or eager, or a
    backend callable); one table per loss, given to `GlobalContrastiveLoss(kernels=...)` (None there: eager)."""

    FUNCTIONS = (whole_log_phi_block, rank_log_phi_block, coefficient_block, kept_coefficient_block)

    def __init__(self, backend="inductor"):
        self.backend = backend
        for fn in self.FUNCTIONS:
            # fullgraph: a graph break would run the passes eagerly and unfused, so it is an error here.
            setattr(self, fn.__name__, torch.compile(fn, backend=backend, fullgraph=True))
