"""NeuCLIP's normaliser-prediction network (`loss.normaliser: neural`): log u from a sample's own embeddings.

Instead of one stored (u_x, u_z) row per training sample, two sets of m prototype embeddings W1 (text-like,
for image anchors) and W2 (image-like, for text anchors) predict every anchor's log-normaliser from its
features (NeuCLIP, papers/neuclip.txt, eqs. 10-11, with TuneCLIP's surrogate l in place of the linear one):

  log u_x(i) = log(1/m sum_j exp(l(cos(f_i, W1_j) - f_i.g_i) / tau))       eq. (10), alpha_1 = log(eps + u_x)
  log u_z(i) = log(1/m sum_j exp(l(cos(g_i, W2_j) - f_i.g_i) / tau))       eq. (11), alpha_2 = log(eps + u_z)

W1, W2 minimise the joint objective eq. (12) given the encoders, whose (W1, W2) part on a batch is

  tau/B sum_i [exp(log(eps + Phi1_i) - alpha_1(i)) + alpha_1(i)] + (the same for Phi2, alpha_2)

(its minimiser over a free alpha is log(eps + Phi): the network is fitted to the batch estimates, and
its fit averages them over batches). Each CLIP step (paper Algorithm 1) first restarts W1 / W2 from the
global batch's text / image embeddings when the step number is a multiple of T_r
(`loss.neural_restart_every`), then takes T_u (`loss.neural_updates`) AdaGrad steps (`loss.neural_lr`) on
this batch's detached embeddings, and only then predicts the log u this step's gradient divides by. The
objective treats log u as a constant, as it does the table's; OSR trains the network on its batches at w0
as it fills the table.

Placement: replicated. W1, W2 and their AdaGrad sums are 4 m D floats (64 MB at m 4096, D 1024 in
float32; 16 MB each), small next to the model. Every rank all-gathers the global batch's detached
features and log Phi once per step (B (2D + 2) floats) and computes the same T_u updates on the same
tensors, so the replicas stay identical bit for bit with no further communication; all-reducing the
gradient instead would cost T_u all-reduces of 2 m D floats per step (10 x 32 MB at the defaults), for a
saving of compute the network does not need (B m D per update, a few percent of the step: NeuCLIP's Table 5).
The state goes into the checkpoint folder as one safetensors file written by rank 0 and read by every rank,
so a checkpoint resumes on any world size.

A restart draws its m prototypes from the global batch by a permutation seeded by the step number, so it is
the same on every rank and on resume; AdaGrad's sums restart with the weights. When the global batch holds
fewer than m pairs, every pair fills floor(m / B) or ceil(m / B) of the m columns. Copies of one column
start equal, receive equal gradients and so stay equal until the next restart: the network holds each
distinct prototype once with its multiplicity c_j (`counts`), sum_j over m columns becomes sum_j c_j over
min(m, B) rows, and each row's AdaGrad step uses one copy's gradient (its gradient / c_j). This is the
m-column network exactly, at min(m, B) / m of its memory and compute (B 64, m 4096: 1/64).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from engine.distributed import DistContext, barrier
from engine.distributed import gather_no_grad as gather_all_ranks
from engine.io import write_atomic
from engine.objectives.contrastive import SurrogateSpec, log_eps_plus, pairwise_surrogate

if TYPE_CHECKING:
    from collections.abc import Callable

    from engine.config import LossConfig

logger = logging.getLogger(__name__)

STATE_FILE = "neural_normaliser.safetensors"
# Prototypes for image / text anchors, their AdaGrad sums, and how many of the m columns each row stands for.
TENSORS = ("w1", "w2", "sum1", "sum2", "counts")
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default
MAX_LOG_RATIO = 30.0  # exp(log(eps + Phi) - alpha) is capped at e^30: a far-off prediction's gradient stays finite
RESTART_SEED = 0x5EED  # restarts draw prototypes with torch.Generator seeded RESTART_SEED + step


def prototype_log_normaliser(anchors: Tensor, positives: Tensor, prototypes: Tensor, *, surrogate: SurrogateSpec,
                             counts: Tensor | None = None) -> Tensor:
    """log(1/m sum_j c_j exp(l(cos(e_i, W_j) - s_ii) / tau)) ([n]) of anchors e ([n, D]) with positive similarities
    s_ii ([n]) against prototypes W ([k, D]) standing for c_j columns each (m = sum c_j; default one each):
    eq. (10) / (11) without eps (the objective adds it)."""
    cos = torch.nn.functional.normalize(anchors, dim=1) @ torch.nn.functional.normalize(prototypes, dim=1).T
    scaled = pairwise_surrogate(cos - positives[:, None], kind=surrogate.kind, margin=surrogate.margin) / surrogate.tau
    if counts is None:
        return torch.logsumexp(scaled, dim=1) - math.log(prototypes.shape[0])
    return torch.logsumexp(scaled + counts.log(), dim=1) - counts.sum().log()


def network_fit_and_gradient(anchors: Tensor, positives: Tensor, prototypes: Tensor, counts: Tensor,
                             log_phi: Tensor, *, surrogate: SurrogateSpec) -> tuple[Tensor, Tensor]:
    """Eq. (12)'s part in the network, tau/B sum_i [exp(log(eps + Phi_i) - alpha_i) + alpha_i] summed over the two
    sides (the constant 2 tau (rho - 1) left out), and its gradient in the prototypes, in closed form.

    Side s of [2, ...]: unit anchors ([2, B, D]: image features, then text features), the pairs' positive
    similarities s_ii ([B]), prototypes ([2, k, D]: W1, W2) standing for `counts` columns each ([k]), batch
    estimates log Phi ([2, B]). The factor exp(log(eps + Phi) - alpha) is capped at e^MAX_LOG_RATIO (value and
    gradient alike), so a prediction far below the batch estimate still moves up with a finite step.
    """
    tau, num_anchors = surrogate.tau, anchors.shape[1]
    norms = prototypes.norm(dim=2, keepdim=True)
    unit = prototypes / norms
    d = torch.bmm(anchors, unit.transpose(1, 2)) - positives[None, :, None]  # cos(e_i, W_j) - s_ii
    if surrogate.kind == "hgcl":
        hinge = torch.clamp(d + surrogate.margin, min=0.0)
        z, slope = hinge.square().div_(tau), hinge.mul_(2.0 / tau)  # l(d) / tau and l'(d) / tau
    else:
        z, slope = d.div_(tau), None
    log_m = counts.sum().log()
    z.add_(counts.log())
    alpha = log_eps_plus(torch.logsumexp(z, dim=2) - log_m, surrogate.eps)  # eqs. (10), (11)
    weight = torch.exp(torch.clamp(log_eps_plus(log_phi, surrogate.eps) - alpha, max=MAX_LOG_RATIO))
    fit = tau * (weight + alpha).mean(dim=1).sum()
    # d fit / d alpha_i = tau/B (1 - weight_i); d alpha_i / d z_ij = c_j exp(z_ij) / (m (eps + u_i)).
    coef = z.sub_((alpha + log_m)[:, :, None]).exp_().mul_((tau / num_anchors * (1.0 - weight))[:, :, None])
    if slope is not None:
        coef.mul_(slope)
    else:
        coef.div_(tau)
    grad_unit = torch.bmm(coef.transpose(1, 2), anchors)  # d fit / d (W_j / |W_j|)
    grad = (grad_unit - (grad_unit * unit).sum(dim=2, keepdim=True) * unit) / norms
    return fit, grad


def adagrad_step(param: Tensor, grad: Tensor, grad_sum: Tensor, *, lr: float) -> tuple[Tensor, Tensor]:
    """One AdaGrad step (torch.optim.Adagrad's rule, no decay), out of place: the new parameter and sum."""
    grad_sum = grad_sum + grad * grad
    return param - lr * grad / (grad_sum.sqrt() + ADAGRAD_EPS), grad_sum


def restart_indices(num_pairs: int, num_prototypes: int, *, step: int) -> tuple[Tensor, Tensor]:
    """Which pairs of a global batch of `num_pairs` become the m prototypes at a restart, and how many columns
    each fills: the first min(m, B) of a permutation seeded by `step`; when B < m the permutation repeated over
    the m columns, so the first m mod B pairs fill one column more."""
    generator = torch.Generator().manual_seed(RESTART_SEED + step)
    perm = torch.randperm(num_pairs, generator=generator)
    if num_pairs >= num_prototypes:
        return perm[:num_prototypes], torch.ones(num_prototypes, dtype=torch.int64)
    counts = torch.full((num_pairs,), num_prototypes // num_pairs, dtype=torch.int64)
    counts[: num_prototypes % num_pairs] += 1
    return perm, counts


class NeuralNormaliser:
    """NeuCLIP's prototype network as a normaliser: replicated, trained by AdaGrad inside each step (see module)."""

    placement = "replicated"

    def __init__(self, *, ctx: DistContext | None = None, num_prototypes: int = 4096, restart_every: int = 500,
                 updates: int = 10, lr: float = 1.0, device: torch.device | None = None):
        self.ctx = ctx
        self.device = device
        self.num_prototypes = num_prototypes
        self.restart_every = restart_every
        self.updates = updates
        self.lr = lr
        self.state: dict[str, Tensor] | None = None  # TENSORS, None before the first step (or after reset)
        self.steps = 0  # CLIP steps taken (OSR and fine-tuning): t of Algorithm 1
        self.restarts = 0
        self.provenance: dict = {}
        self._staged: tuple[dict[str, Tensor], bool] | None = None  # the updated network, whether it restarted
        self._fit: Tensor | None = None

    # ----- one step -----
    def estimate(self, rows: Tensor, log_phi_x: Tensor, log_phi_z: Tensor, *, image_features: Tensor,
                 text_features: Tensor, surrogate: SurrogateSpec,
                 gather: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Algorithm 1, lines 3-10: restart when due, T_u AdaGrad steps on the global batch, then this rank's
        anchors' log u from the updated network (staged until `commit`). `gather`: the objective's gather of the
        step's real global batch (default: the process group's equal-shape all-gather)."""
        gather_rows = gather or gather_all_ranks
        with torch.no_grad():
            f, g = self._upcast(image_features.detach()), self._upcast(text_features.detach())
            f_all, g_all = gather_rows(f), gather_rows(g)
            log_phi = torch.stack([gather_rows(self._upcast(log_phi_x)), gather_rows(self._upcast(log_phi_z))])
            restart = self.state is None or self.steps % self.restart_every == 0  # line 3
            state = self._restarted(f_all, g_all) if restart else self.state
            counts = state["counts"].to(device=f.device, dtype=f.dtype)
            w = torch.stack([state["w1"], state["w2"]]).to(device=f.device, dtype=f.dtype)
            grad_sum = torch.stack([state["sum1"], state["sum2"]]).to(device=f.device, dtype=f.dtype)
            anchors = torch.stack([torch.nn.functional.normalize(f_all, dim=1),
                                   torch.nn.functional.normalize(g_all, dim=1)])
            positives = (f_all * g_all).sum(dim=1)
            for _ in range(self.updates):  # lines 6-8: T_u AdaGrad steps on this batch
                w, grad_sum = self._update(w, grad_sum, counts, anchors, positives, log_phi, surrogate=surrogate)
            self._staged = ({"w1": w[0], "w2": w[1], "sum1": grad_sum[0], "sum2": grad_sum[1], "counts": counts},
                            restart)
            pos = (f * g).sum(dim=1)  # line 10: this rank's anchors
            log_u_x = prototype_log_normaliser(f, pos, w[0], surrogate=surrogate, counts=counts)
            log_u_z = prototype_log_normaliser(g, pos, w[1], surrogate=surrogate, counts=counts)
        return log_u_x, log_u_z

    @staticmethod
    def _upcast(x: Tensor) -> Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def _restarted(self, f_all: Tensor, g_all: Tensor) -> dict[str, Tensor]:
        """Algorithm 1, line 4: W1 from the batch's text embeddings, W2 from the same pairs' image embeddings."""
        index, counts = restart_indices(f_all.shape[0], self.num_prototypes, step=self.steps)
        index = index.to(f_all.device)
        w1, w2 = g_all[index].clone(), f_all[index].clone()
        return {"w1": w1, "w2": w2, "sum1": torch.zeros_like(w1), "sum2": torch.zeros_like(w2),
                "counts": counts.to(device=f_all.device, dtype=f_all.dtype)}

    def _update(self, w: Tensor, grad_sum: Tensor, counts: Tensor, anchors: Tensor, positives: Tensor,
                log_phi: Tensor, *, surrogate: SurrogateSpec) -> tuple[Tensor, Tensor]:
        """One AdaGrad step of [W1, W2] on eq. (12) over the global batch."""
        fit, grad = network_fit_and_gradient(anchors, positives, w, counts, log_phi, surrogate=surrogate)
        self._fit = fit
        # A row's gradient is the sum over the c_j columns it stands for; AdaGrad steps each column.
        return adagrad_step(w, grad / counts[:, None], grad_sum, lr=self.lr)

    def commit(self) -> None:
        if self._staged is None:
            return
        self.state, restarted = self._staged
        self.restarts += int(restarted)
        self.steps += 1
        self._staged = None

    def discard(self) -> None:
        self._staged = None

    def metrics(self) -> dict[str, float]:
        """eq. (12)'s network part on this batch before the last update (the fit the network is trained on)."""
        return {} if self._fit is None else {"neural_fit": float(self._fit)}

    def end_epoch(self) -> None:
        """Nothing follows epochs (restarts follow steps)."""

    def reset(self) -> None:
        """Forget the network: the next step restarts it (and counts from 0 again)."""
        self.state, self._staged, self._fit = None, None, None
        self.steps = self.restarts = 0

    def set_provenance(self, provenance: dict) -> None:
        self.provenance = dict(provenance)

    def summary(self) -> dict:
        return {"neural_steps": self.steps, "neural_restarts": self.restarts}

    # ----- checkpoint -----
    def state_dict(self) -> dict:
        return {"steps": self.steps, "restarts": self.restarts, "provenance": self.provenance,
                "num_prototypes": self.num_prototypes}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.restarts = int(state["steps"]), int(state["restarts"])
        self.provenance = dict(state.get("provenance", {}))

    def save(self, directory: Path) -> None:
        """Rank 0 writes the network and its AdaGrad sums (empty before the first step); collective."""
        directory = Path(directory)
        if self.ctx is None or self.ctx.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            tensors = {} if self.state is None else {k: self.state[k].detach().cpu().contiguous() for k in TENSORS}
            write_atomic(directory / STATE_FILE, save(tensors, metadata={"steps": str(self.steps)}))
        barrier()

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Every rank reads the same file (replicated: any world size)."""
        path = Path(directory) / STATE_FILE
        tensors = load_file(path)
        if tensors and set(tensors) != set(TENSORS):
            raise ValueError(f"{path}: holds {sorted(tensors)}, not the network's {list(TENSORS)}")
        if tensors and int(tensors["counts"].sum()) != self.num_prototypes:
            raise ValueError(f"{path}: {int(tensors['counts'].sum())} prototypes, loss.neural_prototypes is "
                             f"{self.num_prototypes}; resume with the checkpoint's value")
        self.state = {k: v.to(self.device) for k, v in tensors.items()} if tensors else None
        self._staged = None

    def close(self) -> None:
        """Nothing is open."""


def build_neural_normaliser(loss_cfg: LossConfig, *, ctx: DistContext, device: torch.device | None = None,
                            **_) -> NeuralNormaliser:
    """NeuCLIP's network, with the loss section's neural_* settings (no per-sample state: no folder of its own)."""
    return NeuralNormaliser(ctx=ctx, num_prototypes=loss_cfg.neural_prototypes,
                            restart_every=loss_cfg.neural_restart_every, updates=loss_cfg.neural_updates,
                            lr=loss_cfg.neural_lr, device=device)
