"""Work lists that let one kernel launch update many tensors (optimizer steps, gradient norms).

Imports from fasttrain_kernels: nothing.

A model has hundreds of parameters; one launch each costs more than the update of
the small ones. A multi-tensor kernel instead gets two device tables:

    rows   (n_tensors, n_columns + 1) int64: the data_ptr of each column's tensor
           (param, grad, ...), then the element count;
    chunks (n_chunks, 2) int64: (row, first element) of every CHUNK-element piece,
           one program each, so a large tensor is spread over many programs.

The kernel casts the addresses back to typed pointers. The tables depend only on
the addresses, so `TensorTable` keeps them on the device and rebuilds them (one
asynchronous copy) only when an address changes: no host sync, and nothing to copy
at all while the tensors stay put (which also makes the launches CUDA-graph safe).
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
        self._tables: tuple[Tensor, Tensor] | None = None
        self.aligned = False  # whether every address in the tables is a multiple of 16 bytes

    def __call__(self, columns: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor]:
        """Tables for `columns`: equal-length lists, row i made of the i-th tensor of each (same numel)."""
        first = columns[0]
        key = (CHUNK, *(t.data_ptr() for column in columns for t in column), *(t.numel() for t in first))
        if key != self._key:
            numels = torch.tensor([t.numel() for t in first], dtype=torch.int64)
            rows = torch.tensor([[t.data_ptr() for t in row] for row in zip(*columns)], dtype=torch.int64)
            rows = torch.cat([rows, numels.unsqueeze(1)], dim=1)
            per_tensor = (numels + CHUNK - 1) // CHUNK
            row_of_chunk = torch.repeat_interleave(torch.arange(len(first)), per_tensor)
            first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
            start = (torch.arange(len(row_of_chunk)) - first_chunk[row_of_chunk]) * CHUNK
            chunks = torch.stack([row_of_chunk, start], dim=1)
            self._tables = (_to_device(rows, first[0].device), _to_device(chunks, first[0].device))
            self._key = key
            self.aligned = all(t.data_ptr() % 16 == 0 for column in columns for t in column)
        assert self._tables is not None  # built above on the first call
        return self._tables


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return t.contiguous()
    return t.pin_memory().to(device, non_blocking=True)  # the pinned buffer lives until the copy is done
