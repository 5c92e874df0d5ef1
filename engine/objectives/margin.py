"""How HGCL's margin meets the data: the distribution of d = s_ij - s_ii over a global batch, and the rule
behind `loss.margin=auto`.

HGCL's pairwise loss max(d + m, 0)^2 is zero for pairs with d <= -m, so the share of pairs "inside the
hinge" (d > -m) decides how much of the batch the loss sees at all. That share depends on the model's
similarity spread, which differs a lot between a small model and the paper's strong checkpoints.
`DistanceHistogram` counts d (both anchor directions, j != i) in fixed bins summed over ranks, so its
quantiles are those of the global batch whatever the world size; `auto_margin` turns a target share
inside the hinge into m = -Q_{1-share}(d) at w0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Bins of d over [-2, 2] (d of unit vectors lies there): 1/400 wide, exact enough for quantiles.
NUM_BINS, LOW, HIGH = 1600, -2.0, 2.0
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def pair_distances(image_features: Tensor, text_features: Tensor, *, offset: int,
                   gather: Callable[[Tensor], Tensor]) -> Tensor:
    """d for this rank's anchors against the global batch: s_ij - s_ii (image anchors) and s_ji - s_ii
    (text anchors), j != i, flattened (2 * local * (global - 1) values). `offset`: this rank's first row."""
    with torch.no_grad():
        f, g = image_features.detach().float(), text_features.detach().float()
        all_f, all_g = gather(f), gather(g)
        n, total = f.shape[0], all_f.shape[0]
        pos = (f * g).sum(dim=1, keepdim=True)
        off = torch.ones(n, total, dtype=torch.bool, device=f.device)
        off[torch.arange(n), offset + torch.arange(n)] = False
        d_image = (f @ all_g.T - pos)[off]
        d_text = (g @ all_f.T - pos)[off]
        return torch.cat([d_image, d_text])


class DistanceHistogram:
    """Counts of d in fixed bins, accumulated over batches (and ranks, through `reduce_sum`)."""

    def __init__(self):
        self.counts = torch.zeros(NUM_BINS, dtype=torch.float64)

    def add(self, d: Tensor, *, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        """Add one batch's d (this rank's share); returns that batch's global counts."""
        counts = torch.histc(d.float().clamp(LOW, HIGH), bins=NUM_BINS, min=LOW, max=HIGH).double()
        counts = reduce_sum(counts.to(d.device)).cpu()
        self.counts += counts
        return counts

    def quantile(self, q: float, counts: Tensor | None = None) -> float:
        """The q-quantile of d (upper edge of the bin where the cumulative share reaches q)."""
        counts = self.counts if counts is None else counts
        cumulative = torch.cumsum(counts, 0) / counts.sum().clamp(min=1)
        index = int(torch.searchsorted(cumulative, torch.tensor(q, dtype=cumulative.dtype)).clamp(max=NUM_BINS - 1))
        return LOW + (index + 1) * (HIGH - LOW) / NUM_BINS

    def share_above(self, threshold: float, counts: Tensor | None = None) -> float:
        """Share of d greater than `threshold` (bin resolution)."""
        counts = self.counts if counts is None else counts
        first = round((threshold - LOW) / (HIGH - LOW) * NUM_BINS)
        return float(counts[max(0, min(NUM_BINS, first)):].sum() / counts.sum().clamp(min=1))


def margin_diagnostics(d: Tensor, *, margin: float, reduce_sum: Callable[[Tensor], Tensor],
                       histogram: DistanceHistogram | None = None) -> dict[str, float]:
    """Quantiles of d over the global batch (`d_q05` ... `d_q99`) and `inside_hinge`, the exact share of pairs
    with d > -m; adds the batch to `histogram` when given."""
    hist = histogram or DistanceHistogram()
    counts = hist.add(d, reduce_sum=reduce_sum)
    inside = reduce_sum(torch.stack([(d > -margin).sum().double(), torch.tensor(d.numel(), dtype=torch.float64,
                                                                               device=d.device)]))
    out = {f"d_q{round(100 * q):02d}": hist.quantile(q, counts) for q in QUANTILES}
    out["inside_hinge"] = float(inside[0] / inside[1].clamp(min=1))
    return out


def auto_margin(histogram: DistanceHistogram, *, inside_share: float) -> float:
    """The margin that puts `inside_share` of the pairs inside the hinge: m = -Q_{1 - share}(d), at least 0."""
    return max(0.0, -histogram.quantile(1.0 - inside_share))
