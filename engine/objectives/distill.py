"""Similarity distillation (TRACER): the student's image-text similarity distributions pulled towards a teacher's.

Over the global batch of B pairs, with the job's fixed temperature tau, student logits S = f g^T / tau and
teacher logits T = f_T g_T^T / tau (teacher features, no gradient):

  L = -1/B sum_i [ sum_j softmax(T_i.)_j log softmax(S_i.)_j + sum_j softmax(T^T_i.)_j log softmax(S^T_i.)_j ]

(image -> text rows plus text -> image rows, a mean over the B anchors).

Distribution follows `engine.objectives.contrastive.GlobalContrastiveLoss`: each rank differentiates the rows
of its own anchors against the gathered batch (no gradient through the gather), sums the gradient of the
gathered columns over ranks (one all-reduce), keeps its own slice, and carries the resulting gradient of L with
respect to its local features, scaled by the world size because backends average parameter gradients over
ranks. The value is L on every rank. One process with offset 0 is the single-process computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _upcast(*tensors: Tensor) -> list[Tensor]:
    """Math in float32 at least (bf16 features), float64 when given."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


def distillation_rows(anchors: Tensor, columns: Tensor, teacher_anchors: Tensor, teacher_columns: Tensor, *,
                      tau: float) -> Tensor:
    """-sum_i sum_j softmax(t_i . T_j / tau)_j log softmax(a_i . C_j / tau)_j over the given anchor rows."""
    log_student = torch.log_softmax(anchors @ columns.T / tau, dim=1)
    teacher = torch.softmax(teacher_anchors @ teacher_columns.T / tau, dim=1)
    return -(teacher * log_student).sum()


def similarity_distillation(image_features: Tensor, text_features: Tensor, teacher_image: Tensor,
                            teacher_text: Tensor, *, tau: float, offset: int, world_size: int,
                            gather: Callable[[Tensor], Tensor], reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
    """L (module doc) as a scalar whose value is the global batch's and whose gradient with respect to this rank's
    `image_features` / `text_features` ([b, d], with grad) is `world_size` x dL/d(local features).

    `teacher_image` / `teacher_text` are the teacher's features of the whole global batch ([B, d], gathered);
    `offset` is this rank's first index in it; `gather` / `reduce_sum` are collectives without gradient.
    """
    num_local = image_features.shape[0]
    with torch.no_grad():
        f_local, g_local = _upcast(image_features.detach(), text_features.detach())
        f_global, g_global = gather(f_local), gather(g_local)
        t_img, t_txt = _upcast(teacher_image.detach(), teacher_text.detach())
    num_global = f_global.shape[0]
    leaves = [t.clone().requires_grad_(True) for t in (f_local, g_local, f_global, g_global)]
    f_anchor, g_anchor, f_cols, g_cols = leaves
    local = slice(offset, offset + num_local)
    with torch.enable_grad():
        rows = (distillation_rows(f_anchor, g_cols, t_img[local], t_txt, tau=tau)
                + distillation_rows(g_anchor, f_cols, t_txt[local], t_img, tau=tau)) / num_global
        grad_f, grad_g, grad_f_cols, grad_g_cols = torch.autograd.grad(rows, leaves)
    with torch.no_grad():
        # Other ranks' rows reach this rank's features as columns: sum the column gradients over ranks.
        summed = reduce_sum(torch.cat([grad_f_cols.reshape(-1), grad_g_cols.reshape(-1), rows.detach().reshape(1)]))
        size = grad_f_cols.numel()
        grad_f = grad_f + summed[:size].view_as(grad_f_cols)[local]
        grad_g = grad_g + summed[size:2 * size].view_as(grad_g_cols)[local]
        value = summed[-1]
    surrogate = (image_features.to(grad_f.dtype) * grad_f).sum() + (text_features.to(grad_g.dtype) * grad_g).sum()
    return value + float(world_size) * (surrogate - surrogate.detach())
