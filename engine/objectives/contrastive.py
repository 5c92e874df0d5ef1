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

from engine.objectives.normaliser import update_log_estimate  # SogCLR's moving average: the table's rule

SURROGATES = ("gcl", "hgcl")


def pairwise_surrogate(d: Tensor, *, kind: str, margin: float) -> Tensor:
    """l(d): GCL l(d) = d; HGCL l(d) = max(d + m, 0)^2 (paper eq. 8)."""
    if kind == "gcl":
        return d
    if kind == "hgcl":
        return torch.clamp(d + margin, min=0.0).square()
    raise ValueError(f"unknown surrogate {kind!r}; expected one of {SURROGATES}")


def pairwise_surrogate_slope(d: Tensor, *, kind: str, margin: float) -> Tensor:
    """l'(d), the derivative of `pairwise_surrogate` (zero on HGCL's flat side)."""
    if kind == "gcl":
        return torch.ones_like(d)
    if kind == "hgcl":
        return 2.0 * torch.clamp(d + margin, min=0.0)
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


def _diag_mask(offset: int, num_local: int, start: int, stop: int, device) -> Tensor:
    """[num_local, stop-start] bool mask of the positive pair (global index == anchor index)."""
    rows = torch.arange(offset, offset + num_local, device=device).unsqueeze(1)
    cols = torch.arange(start, stop, device=device).unsqueeze(0)
    return rows == cols


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
        f_local, g_local, f_global, g_global = _upcast(f_local, g_local, f_global, g_global)
        num_global, num_local = f_global.shape[0], f_local.shape[0]
        pos = (f_local * g_local).sum(dim=1, keepdim=True)  # s_ii of the local anchors
        blocks_x, blocks_z = [], []
        for start, stop in _chunks(num_global, spec.chunk_size):
            diag = _diag_mask(offset, num_local, start, stop, f_local.device)
            s_img = f_local @ g_global[start:stop].T  # s_{a,k}: local image anchor a, text k
            s_txt = g_local @ f_global[start:stop].T  # s_{k,b}: local text anchor b, image k
            lx = pairwise_surrogate(s_img - pos, kind=spec.kind, margin=spec.margin) / spec.tau
            lz = pairwise_surrogate(s_txt - pos, kind=spec.kind, margin=spec.margin) / spec.tau
            blocks_x.append(torch.logsumexp(lx.masked_fill(diag, -math.inf), dim=1))
            blocks_z.append(torch.logsumexp(lz.masked_fill(diag, -math.inf), dim=1))
        log_b = math.log(num_global)
        log_phi_x = torch.logsumexp(torch.stack(blocks_x, dim=1), dim=1) - log_b
        log_phi_z = torch.logsumexp(torch.stack(blocks_z, dim=1), dim=1) - log_b
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
) -> tuple[Tensor, Tensor]:
    """dG/df, dG/dg for the local features: the paper's estimator G (eq. 4) in closed form.

    `log_wx_global`, `log_wz_global` are log(eps + u) of every anchor of the global batch
    ([B], after this step's update). Returns float32 tensors shaped like f_local, g_local.

    With coefficients A_ik (image anchor i vs text k) and C_ik (text anchor i vs image k),
    c = exp(l/tau - log(eps+u_i)) * l'(d) / B^2, the gradients are
      df_a = sum_k (A_ak + C_ka) g_k - (sum_k A_ak + C_ak) g_a
      dg_b = sum_k (A_kb + C_bk) f_k - (sum_k A_bk + C_bk) f_b
    and every block needs only local rows against a chunk of global columns.
    """
    with torch.no_grad():
        f_local, g_local, f_global, g_global = _upcast(f_local, g_local, f_global, g_global)
        log_wx_global, log_wz_global = log_wx_global.to(f_local.dtype), log_wz_global.to(f_local.dtype)
        num_global, num_local = f_global.shape[0], f_local.shape[0]
        scale = 1.0 / (num_global * num_global)
        pos_local = (f_local * g_local).sum(dim=1, keepdim=True)  # [b,1]
        pos_global = (f_global * g_global).sum(dim=1)  # [B]
        lwx_local = log_wx_global[offset : offset + num_local].unsqueeze(1)
        lwz_local = log_wz_global[offset : offset + num_local].unsqueeze(1)
        grad_f = torch.zeros_like(f_local)
        grad_g = torch.zeros_like(g_local)
        row_sum = torch.zeros_like(pos_local)  # sum_k A_ak + C_ak for local a
        for start, stop in _chunks(num_global, spec.chunk_size):
            diag = _diag_mask(offset, num_local, start, stop, f_local.device)
            pos_k = pos_global[start:stop].unsqueeze(0)
            g_chunk, f_chunk = g_global[start:stop], f_global[start:stop]
            # Blocks are consumed as soon as possible: at most ~4 [b, chunk] tensors live at once.
            s_fg = f_local @ g_chunk.T  # [b,c] = s_{a,k}
            # A[a,k]: image anchor a (local) vs text k; C[k,a]: text anchor k vs image a (local).
            a_rows = _coefficient_(s_fg - pos_local, lwx_local, diag, spec)
            c_cols = _coefficient_(s_fg.sub_(pos_k), log_wz_global[start:stop].unsqueeze(0), diag, spec)
            del s_fg
            row_sum += a_rows.sum(dim=1, keepdim=True)
            grad_f.addmm_(a_rows.add_(c_cols), g_chunk, alpha=scale)
            del a_rows, c_cols
            s_gf = g_local @ f_chunk.T  # [b,c] = s_{k,b}
            # C[b,k]: text anchor b (local) vs image k; A[k,b]: image anchor k vs text b (local).
            c_rows = _coefficient_(s_gf - pos_local, lwz_local, diag, spec)
            a_cols = _coefficient_(s_gf.sub_(pos_k), log_wx_global[start:stop].unsqueeze(0), diag, spec)
            del s_gf
            row_sum += c_rows.sum(dim=1, keepdim=True)
            grad_g.addmm_(c_rows.add_(a_cols), f_chunk, alpha=scale)
            del c_rows, a_cols
        # s_aa enters every term of both of sample a's anchor rows with a minus sign.
        grad_f -= scale * row_sum * g_local
        grad_g -= scale * row_sum * f_local
    return grad_f, grad_g


def _coefficient_(d: Tensor, log_w: Tensor, diag: Tensor, spec: SurrogateSpec) -> Tensor:
    """exp(l(d)/tau - log w) * l'(d), zero on the positive pair; overwrites `d` (a temporary)."""
    if spec.kind == "gcl":  # l(d) = d, l' = 1
        return d.div_(spec.tau).sub_(log_w).exp_().masked_fill_(diag, 0.0)
    hinge = d.add_(spec.margin).clamp_(min=0.0)  # max(d + m, 0)
    weight = hinge.square().div_(spec.tau).sub_(log_w).exp_()
    return weight.mul_(hinge).mul_(2.0).masked_fill_(diag, 0.0)  # l'(d) = 2 max(d + m, 0)


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


def _identity_gather(x: Tensor) -> Tensor:
    return x


class GlobalContrastiveLoss:
    """GCL / HGCL with SogCLR normalisers (paper eqs. 2-4, 8, 9), chunked, distribution-ready.

    `gather` concatenates a tensor over ranks along dim 0 without gradient and `reduce_sum`
    sums over ranks (both identity for one process); `offset` is this rank's first index in the
    global batch. Reported values are global; the objective's gradient, averaged over ranks as
    data-parallel backends do, is G.
    """

    def __init__(self, spec: SurrogateSpec, *, gather: Gather = _identity_gather,
                 reduce_sum: Gather = _identity_gather, world_size: int = 1):
        self.spec = spec
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
        log_phi_x, log_phi_z = anchor_log_phi(
            image_features, text_features, f_global, g_global, offset=offset, spec=self.spec
        )
        return BatchEstimates(f_global, g_global, log_phi_x, log_phi_z)

    def divided(self, image_features: Tensor, text_features: Tensor, batch: BatchEstimates, *, log_u_x: Tensor,
                log_u_z: Tensor, offset: int = 0, output_dict: bool = False):
        """The objective of `forward` for the normaliser's estimates `log_u_x`, `log_u_z` of the local anchors
        (after this step's update): value tau/B sum_i [log(eps + u_x) + log(eps + u_z)], gradient G."""
        spec = self.spec
        f_global, g_global, log_phi_x, log_phi_z = batch
        num_global = f_global.shape[0]
        log_wx, log_wz = log_eps_plus(log_u_x, spec.eps), log_eps_plus(log_u_z, spec.eps)
        log_wx_global = self.gather(log_wx)
        log_wz_global = self.gather(log_wz)
        grad_f, grad_g = feature_gradients(
            image_features, text_features, f_global, g_global, log_wx_global, log_wz_global,
            offset=offset, spec=spec,
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
