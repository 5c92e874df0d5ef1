"""The teacher's weights in a checkpoint: one safetensors file of whole float32 parameters, whatever the world size.

Each rank holds a part of every parameter (`Backend.parameter_spans`: a range of the flattened parameter; the
whole where the model is replicated). `write_whole` assembles one parameter at a time from every rank's part
(one all-gather each) and rank 0 streams it into the file, so no rank ever holds more than one whole parameter
besides its own parts; `read_parts` gives each rank just the elements of its own ranges (reading only the rows
that cover them), on any number of ranks and under any backend.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from engine.io import atomic_open

TEACHER_FILE = "teacher.safetensors"
Span = tuple[int, int, tuple[int, ...]]  # (start, stop, whole shape): elements start..stop-1 of the flat parameter


def write_whole(path: Path, parts: dict[str, Tensor], spans: dict[str, Span], *, gather: Callable[[Tensor], Tensor],
                is_main: bool, metadata: dict[str, str]) -> None:
    """Collective: every rank's float32 `parts` (name -> its part, the first stop - start elements valid) become
    whole parameters, written by rank 0 into the safetensors file `path` (atomically)."""
    names = list(parts)
    # Every rank's (start, stop) of every parameter, in one all-gather: [world, 2 * num_params].
    bounds = gather(torch.tensor([[b for name in names for b in spans[name][:2]]], dtype=torch.int64))
    starts, stops = bounds[:, 0::2], bounds[:, 1::2]
    shapes = {name: spans[name][2] for name in names}
    if not is_main:
        for index, name in enumerate(names):
            _gather_whole(parts[name], starts[:, index], stops[:, index], shapes[name], gather)
        return
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for index, name in enumerate(names):
            whole = _gather_whole(parts[name], starts[:, index], stops[:, index], shapes[name], gather)
            out.write(whole.numpy().tobytes())


def _gather_whole(part: Tensor, starts: Tensor, stops: Tensor, shape: tuple[int, ...],
                  gather: Callable[[Tensor], Tensor]) -> Tensor:
    """The whole flat float32 parameter from every rank's valid elements (padded to the longest for the gather)."""
    longest = int((stops - starts).max())
    flat = part.detach().reshape(-1).float().cpu()
    rank_parts = gather(torch.cat([flat, flat.new_zeros(max(0, longest - flat.numel()))])[:longest][None])
    whole = torch.zeros(math.prod(shape), dtype=torch.float32)
    for values, start, stop in zip(rank_parts, starts.tolist(), stops.tolist()):
        whole[start:stop] = values[:stop - start]
    return whole


def read_parts(path: Path, spans: dict[str, Span], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's float32 parts of the whole parameters in `path`, shaped and placed like `like` (padding zero)."""
    out = {}
    with safe_open(str(path), framework="pt") as stored:
        if set(stored.keys()) != set(spans):
            raise ValueError(f"{path}: the teacher's parameters do not match this model's (another model or "
                             "frozen parameters)")
        for name, (start, stop, shape) in spans.items():
            piece = stored.get_slice(name)
            if tuple(piece.get_shape()) != tuple(shape):
                raise ValueError(f"{path}: the teacher's {name} has shape {piece.get_shape()}, this model's "
                                 f"{list(shape)} (another model)")
            part = torch.zeros(like[name].shape, dtype=torch.float32)
            if stop > start:
                row = math.prod(shape[1:]) if shape else 1
                first, last = start // row, -(-stop // row)
                rows = piece[first:last] if shape else stored.get_tensor(name)
                part.view(-1)[:stop - start] = rows.reshape(-1)[start - first * row:stop - first * row].float()
            out[name] = part.to(like[name].device)
    return out
