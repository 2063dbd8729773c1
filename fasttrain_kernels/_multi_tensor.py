"""Work lists that let one kernel launch update many tensors (optimizer steps, gradient norms).

Imports from fasttrain_kernels: nothing.

A model has hundreds of parameters; one launch each costs more than the update of
the small ones. A multi-tensor kernel instead gets two device tables:

    rows   (n_tensors, n_columns + 1) int64: the data_ptr of each column's tensor
           (param, grad, ...), then the element count;
    chunks (n_chunks, 2) int64: (row, first element) of every CHUNK-element piece,
           one program each, so a large tensor is spread over many programs.

The kernel casts the addresses back to typed pointers. `TensorTable` keeps both
tables on the device between calls. The chunks depend only on the element counts,
so they are built once. The rows change when an address does, and on a training
step they do: `zero_grad` frees the gradients and the next backward gets new ones
from the allocator, often at other addresses (twice a step in the compiled 124M
step on an H200, 2.1 ms of host work each while every change rebuilt both tables
and pinned fresh buffers for them).
So a changed address costs one small asynchronous copy into the same device table,
through a page-locked staging buffer kept with it; no host sync in steady state,
and nothing to copy at all while the tensors stay put (which also makes the
launches CUDA-graph safe).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 65536  # elements per program
BLOCK = 1024  # elements a program handles at once, CHUNK // BLOCK times


class TensorTable:
    """Builds and caches the (rows, chunks) tables of one list of tensors per column."""

    def __init__(self) -> None:
        self._key: tuple[int, ...] | None = None
        self._layout: tuple[int, ...] | None = None  # (CHUNK, columns, numels...) the tables were shaped for
        self._rows = torch.empty(0, dtype=torch.int64)  # made to measure on the first call (layout None)
        self._chunks = torch.empty(0, dtype=torch.int64)
        self._staging: Tensor | None = None  # page-locked host copy of the rows (CUDA only)
        self._copied: torch.cuda.Event | None = None  # the last copy out of the staging buffer is done
        self.aligned = False  # whether every address in the tables is a multiple of 16 bytes

    def __call__(self, columns: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        """Tables for `columns`: equal-length lists, row i made of the i-th tensor of each (same numel)."""
        first = columns[0]
        numels = [t.numel() for t in first]
        pointers = [[t.data_ptr() for t in row] + [n] for row, n in zip(zip(*columns), numels)]
        key = (CHUNK, len(columns), *(p for row in pointers for p in row))
        if key == self._key:
            return self._rows, self._chunks
        device = first[0].device
        rows = torch.tensor(pointers, dtype=torch.int64)
        layout = (CHUNK, len(columns), *numels)
        if layout != self._layout:
            self._chunks = _chunk_table(numels).to(device)
            self._rows = torch.empty_like(rows, device=device)
            self._staging = rows.pin_memory() if device.type == "cuda" else None
            self._copied = None
            self._layout = layout
        if self._staging is None:
            self._rows.copy_(rows)
        else:
            if self._copied is not None:
                self._copied.synchronize()  # the previous copy read the staging buffer (long done by now)
            self._staging.copy_(rows)
            self._rows.copy_(self._staging, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        self._key = key
        self.aligned = all(p % 16 == 0 for row in pointers for p in row[:-1])
        return self._rows, self._chunks


def _chunk_table(numels: list[int]) -> Tensor:
    """(n_chunks, 2) int64 on the host: (row, first element) of every CHUNK-element piece of each tensor."""
    counts = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (counts + CHUNK - 1) // CHUNK
    row_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    start = (torch.arange(len(row_of_chunk)) - first_chunk[row_of_chunk]) * CHUNK
    return torch.stack([row_of_chunk, start], dim=1)
