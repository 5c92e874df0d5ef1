"""`run.compile`: torch.compile of the model's forward, in place, so that parameter names, state dicts,
checkpoints and resume stay exactly as without it, and with `step` of the loss's elementwise work too.

- `blocks`: each residual block of both towers gets a compiled `forward` (one graph per block shape; identical
  blocks share it). The sharding hooks FSDP2 puts around a block stay outside the graph, so this is the mode
  for FSDP2 (as large FSDP trainers compile per block), and it works on one process and under ZeRO-1/2.
- `model`: the whole forward (both towers, projections, normalisation) in one graph: single process and
  ZeRO-1/2, whose parameters are whole during the forward.
- `step`: what `model` compiles, and GCL / HGCL's elementwise work on each similarity block (masked maxima,
  exp terms, hinge, sums: engine/objectives/block_kernels.py), so that inductor fuses those passes into a few
  kernels around the loss's three matrix products. The chunk loop, the collectives and the u table stay eager
  (host-side table reads and writes, gathers: no whole-step graph holds them). On a backend that cannot compile
  the whole forward but can its blocks (FSDP2), the forward part is `blocks` (logged): the loss's kernels see
  gathered features only and compile on every backend. MBCL and SigLIP's loss are not compiled.
Each backend says what it cannot compile (`Backend.compile_problem`): ZeRO-3, which gathers each layer's
partitions in hooks of every sub-module, inside any graph, and FSDP2's whole-model mode; refused in one line.
The evaluator calls the encoders directly and is not compiled (it runs rarely, at other batch sizes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.objectives.block_kernels import BlockKernels

logger = logging.getLogger(__name__)

MODES = ("none", "blocks", "model", "step")


def apply_compile(model: nn.Module, mode: str, *, compile_backend: str = "inductor") -> int:
    """Compile `model`'s forward in place as `mode` says; the number of forwards compiled (0 for none)."""
    if mode == "none":
        return 0
    if mode == "blocks":
        from engine.backends.fsdp import transformer_blocks

        targets = transformer_blocks(model)
    elif mode == "model":
        targets = [model]
    else:
        raise ValueError(f"run.compile must be one of {', '.join(MODES)}, got {mode!r}")
    for module in targets:
        # An instance attribute: nn.Module.__call__ runs the module's hooks (FSDP2's gathers) around it, eagerly.
        module.forward = torch.compile(module.forward, backend=compile_backend)
    logger.info("torch.compile (%s, backend %s): %d forward(s)", mode, compile_backend, len(targets))
    return len(targets)


def is_compiled(module: nn.Module) -> bool:
    """Whether `apply_compile` compiled this module's forward."""
    return "forward" in vars(module) and hasattr(vars(module)["forward"], "_torchdynamo_orig_callable")


def compile_model(backend, run) -> int:
    """`apply_compile` on the backend's model as the run section asks; one ValueError where the backend cannot."""
    problem = backend.compile_problem(run.compile) if run.compile != "none" else None
    if problem:
        raise ValueError(problem)
    mode = run.compile
    if mode == "step":  # the whole forward where the backend can compile it, else its blocks
        mode = "model" if backend.compile_problem("model") is None else "blocks"
        logger.info("run.compile=step: the forward as run.compile=%s, and the loss's block kernels", mode)
    return apply_compile(backend.model, mode, compile_backend=run.compile_backend)


def loss_kernels(run) -> BlockKernels | None:
    """GCL / HGCL's block functions compiled with `run.compile_backend` under run.compile=step; None otherwise."""
    return BlockKernels(run.compile_backend) if run.compile == "step" else None
