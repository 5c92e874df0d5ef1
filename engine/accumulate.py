"""Forward and backward of one step, over the whole local batch at once or in `data.accum_steps` micro-batches.

With K = `data.accum_steps` > 1 this rank's share of the global batch passes through the model K micro-batches
at a time, and the step stays exactly the step on the whole global batch (a feature cache, two passes):

1. each micro-batch is encoded without a graph and its outputs cached (features, the logit bias);
2. the objective runs once over the whole global batch (all-gathered and chunked as in any step) on the cached
   features made leaf tensors: its value, its normaliser update (staged once) and, by autograd, the gradient
   of this rank's terms with respect to each cached feature (and the bias);
3. each micro-batch is encoded again with a graph, from the random state its first encoding started from (so
   dropout draws the same masks), and back-propagated with its cached gradients; the backend accumulates the
   K backwards into one gradient, and the caller takes one optimizer step.

Only the micro-batch's activations are ever held, so the memory of the model's graph does not grow with K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from engine.data import Batch
from engine.objectives import ObjectiveTerms, StepOutputs, total_loss
from models import features_of, logit_bias_of


def step_outputs(model_out) -> StepOutputs:
    """The model's forward output as the terms see it."""
    return StepOutputs(*features_of(model_out), logit_bias_of(model_out), model_out)


class ObjectiveStep(NamedTuple):
    """The objective's entries and their summed terms for the global batch; `backward()` puts the gradient of
    `total` into the backend (every micro-batch's share, when accumulating), ready for one optimizer step."""

    out: dict
    total: Tensor
    backward: Callable[[], None]


def check_terms_accumulate(objective: ObjectiveTerms, accum_steps: int) -> None:
    """Refuse loss terms that do not declare `supports_accumulation` when data.accum_steps > 1."""
    if accum_steps == 1:
        return
    refused = [name for name, (term, _) in objective.terms.items() if not getattr(term, "supports_accumulation", False)]
    if refused:
        raise ValueError(f"data.accum_steps={accum_steps}: loss term(s) {', '.join(refused)} do not support "
                         "gradient accumulation (they need the model beyond its features); set data.accum_steps=1 "
                         f"or remove {', '.join(f'loss.terms.{name}' for name in refused)}")


class ForwardBackward:
    """The step's forward, objective and backward for `backend` and `objective`, in `accum_steps` micro-batches."""

    def __init__(self, backend, objective: ObjectiveTerms, *, accum_steps: int = 1):
        check_terms_accumulate(objective, accum_steps)
        self.backend = backend
        self.objective = objective
        self.accum_steps = accum_steps

    def __call__(self, batch: Batch) -> ObjectiveStep:
        if self.accum_steps == 1:
            out = self.objective(batch, step_outputs(self.backend.forward(batch.images, batch.texts)))
            total = total_loss(out)
            return ObjectiveStep(out, total, lambda: self.backend.backward(total))
        return self._accumulated(batch)

    def encode_no_grad(self, batch: Batch) -> StepOutputs:
        """The model's outputs on this rank's batch without gradient, one micro-batch at a time (`raw` is None
        when there are several)."""
        if self.accum_steps == 1:
            with torch.no_grad():
                return step_outputs(self.backend.forward(batch.images, batch.texts))
        parts = [step_outputs(self.backend.forward_no_grad(batch.images[span], batch.texts[span]))
                 for span in self._spans(batch)]
        return StepOutputs(torch.cat([p.image_features for p in parts]), torch.cat([p.text_features for p in parts]),
                           parts[0].logit_bias, None)

    def _spans(self, batch: Batch) -> list[slice]:
        num = len(batch.images)
        if num % self.accum_steps:
            raise ValueError(f"data.accum_steps={self.accum_steps} does not divide this rank's batch of {num} "
                             "samples; pick a data.batch_size divisible by world size x data.accum_steps")
        size = num // self.accum_steps
        return [slice(k * size, (k + 1) * size) for k in range(self.accum_steps)]

    def _accumulated(self, batch: Batch) -> ObjectiveStep:
        spans = self._spans(batch)
        device = _device_of(self.backend)
        # Pass 1: features without a graph, and the random state each micro-batch started from.
        states, images, texts, bias = [], [], [], None
        for span in spans:
            states.append(_rng_state(device))
            outputs = step_outputs(self.backend.forward_no_grad(batch.images[span], batch.texts[span]))
            images.append(outputs.image_features.detach())
            texts.append(outputs.text_features.detach())
            if bias is None and outputs.logit_bias is not None:
                bias = outputs.logit_bias.detach()
        leaves = [torch.cat(images).requires_grad_(True), torch.cat(texts).requires_grad_(True)]
        if bias is not None:
            leaves.append(bias.clone().requires_grad_(True))
        cached = StepOutputs(leaves[0], leaves[1], leaves[2] if bias is not None else None, None)
        with torch.enable_grad():
            out = self.objective(batch, cached)
            total = total_loss(out)
        after = _rng_state(device)

        def backward() -> None:
            grads = _leaf_gradients(total, leaves)
            # Pass 2: each micro-batch again, with a graph, from the same random state; one backward each.
            for k, span in enumerate(spans):
                _set_rng_state(device, states[k])
                self.backend.begin_micro_batch(last=k == len(spans) - 1)
                outputs = step_outputs(self.backend.forward(batch.images[span], batch.texts[span]))
                surrogate = ((outputs.image_features * grads[0][span].to(outputs.image_features.dtype)).sum()
                             + (outputs.text_features * grads[1][span].to(outputs.text_features.dtype)).sum())
                if k == 0 and bias is not None:  # the bias is one parameter: its gradient enters once
                    surrogate = surrogate + (outputs.logit_bias * grads[2].to(outputs.logit_bias.dtype)).sum()
                self.backend.backward(surrogate)
            _set_rng_state(device, after)

        return ObjectiveStep(out, total.detach(), backward)


def _leaf_gradients(total: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """d total / d leaf for each cached output (zeros where the terms do not depend on it)."""
    if not total.requires_grad:
        return [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]


def _device_of(backend) -> torch.device:
    return torch.device(getattr(backend, "device", "cpu"))


def _rng_state(device: torch.device) -> tuple:
    """The CPU generator's state and, on CUDA, the device's (dropout and patch dropout draw from them)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
