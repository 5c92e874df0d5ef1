"""`run.compile`: torch.compile of the model's forward, in place, so that parameter names, state dicts,
checkpoints and resume stay exactly as without it.

- `blocks`: each residual block of both towers gets a compiled `forward` (one graph per block shape; identical
  blocks share it). The sharding hooks FSDP2 puts around a block stay outside the graph, so this is the mode
  for FSDP2 (as large FSDP trainers compile per block), and it works on one process and under ZeRO-1/2.
- `model`: the whole forward (both towers, projections, normalisation) in one graph: single process and
  ZeRO-1/2, whose parameters are whole during the forward.
Each backend says what it cannot compile (`Backend.compile_problem`): ZeRO-3, which gathers each layer's
partitions in hooks of every sub-module, inside any graph, and FSDP2's whole-model mode; refused in one line.
The evaluator calls the encoders directly and is not compiled (it runs rarely, at other batch sizes).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

MODES = ("none", "blocks", "model")


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
    return apply_compile(backend.model, run.compile, compile_backend=run.compile_backend)
