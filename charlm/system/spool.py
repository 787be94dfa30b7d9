"""Token ids kept on disk while they are drawn, so that generation's memory is flat in --length.

Several samples (or beams) are drawn as one batch, one step at a time, and printed once all of
them are done; a million steps of them must not live in memory. A spool is an unnamed temp
file of int32 rows, one row per step, one column per sample::

    step 0   [id of sample 0, id of sample 1, ...]      row-major, 4 bytes an id
    step 1   [...]
    ...

Rows arrive as tensors, on any device; they are stacked `BLOCK_STEPS` at a time and moved to
the host once per block (no host sync per step). A column is read back in chunks of
`READ_STEPS` rows. In memory at any time: at most one block of rows and one chunk.
"""

from __future__ import annotations

import array
import tempfile
from typing import Iterator

import torch

BLOCK_STEPS = 1024  # rows stacked on the device before they go to the file
READ_STEPS = 1 << 16  # rows read back at once


class IdSpool:
    def __init__(self, width: int):
        self.width = width
        self.steps = 0  # rows in the file
        self._file = tempfile.TemporaryFile(prefix="charlm-ids-")
        self._pending: list[torch.Tensor] = []

    def append(self, row: torch.Tensor) -> None:
        """One step's ids, (width,)."""
        self._pending.append(row)
        if len(self._pending) >= BLOCK_STEPS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.write_rows(self.steps, torch.stack(self._pending))
            self._pending = []

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        """Rows `start`, `start` + 1, ... (one per row of `rows`, (k, width)); the file grows
        to hold them."""
        data = array.array("i", rows.reshape(-1).tolist())  # no numpy needed; native order
        self._file.seek(start * self.width * 4)
        self._file.write(data.tobytes())
        self.steps = max(self.steps, start + rows.size(0))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as an int64 tensor (stop - start, width)."""
        self.flush()
        self._file.seek(start * self.width * 4)
        data = bytearray(self._file.read((stop - start) * self.width * 4))
        if not data:
            return torch.empty(0, self.width, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.int32).view(-1, self.width).long()

    def column(self, k: int) -> Iterator[list[int]]:
        """The ids of column `k`, in chunks of at most READ_STEPS."""
        self.flush()
        for start in range(0, self.steps, READ_STEPS):
            yield self.rows(start, min(start + READ_STEPS, self.steps))[:, k].tolist()

    def lists(self) -> list[list[int]]:
        """Every column whole (memory in proportion to the length: for callers that asked)."""
        return [[i for chunk in self.column(k) for i in chunk] for k in range(self.width)]

    def close(self) -> None:
        self._pending = []
        self._file.close()

    def __enter__(self) -> "IdSpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
