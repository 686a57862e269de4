"""KV-cache rows for in-flight batching: one request per row, each at its own length, decoded together.

A `Rows` object holds up to `capacity` requests. `add(ids)` prefills a prompt alone into a free row and returns
a stable slot id with the prompt's last logits; `step({slot: token})` feeds one token to every occupied row in one
forward and returns each row's logits; `remove(slot)` frees the row at once. Occupied rows stay a prefix of the
batch: freeing a row moves the last row into it.

- ONNX Runtime, KV buffer shared by past and present (`onnxruntime` lowerings with a float or GQA-folded int8
  cache): rows of the device buffers, bound at full width (OnnxRuntimeBackend.step_rows). The padded graph form
  writes every row's new token at the common edge T - 1 and masks through the attention mask, so a row that joins
  simply leaves a hole [its length, T) marked 0 in its mask row (or, when longer than T, moves the edge and leaves
  holes in the others); no cache bytes move. When the edge reaches max_length the rows are compacted (each row's
  positions gathered to its front). The unpadded form keeps each row at [0, length) and GQA takes each row's length
  from its mask sum.
- torch: the model's concatenated cache, holes likewise (zero-filled, masked), rows selected on leave.
- anything else (TensorRT, separate past/present buffers): `OneRow`, one request at a time (`note` says why).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from glmc.errors import GlmcError


class Rows(Protocol):
    capacity: int
    max_length: int
    note: str | None  # why requests run one at a time (None: in-flight batching)

    def add(self, ids: list[int]) -> tuple[int, torch.Tensor]: ...

    def add_many(self, prompts: list[list[int]]) -> list[tuple[int, torch.Tensor]]: ...

    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]: ...

    def remove(self, slot: int) -> None: ...


class _Table:
    """Stable slot ids <-> dense row indices, and each row's length (positions held)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slot_of: list[int] = []  # row -> slot
        self.length: list[int] = []  # row -> tokens held
        self._next = 0

    @property
    def rows(self) -> int:
        return len(self.slot_of)

    def new(self, length: int) -> tuple[int, int]:
        if self.rows >= self.capacity:
            raise GlmcError(f"all {self.capacity} rows are taken")
        self._next += 1
        self.slot_of.append(self._next)
        self.length.append(length)
        return self._next, self.rows - 1

    def row(self, slot: int) -> int:
        try:
            return self.slot_of.index(slot)
        except ValueError:
            raise GlmcError(f"slot {slot} is not occupied") from None

    def order(self, tokens: dict[int, int]) -> list[int]:
        """The tokens in row order; every occupied row must get one."""
        if set(tokens) != set(self.slot_of):
            raise GlmcError(f"a step needs one token for each occupied slot {sorted(self.slot_of)}, got "
                            f"{sorted(tokens)}")
        return [tokens[s] for s in self.slot_of]

    def drop(self, row: int) -> int:
        """Forget `row`; the last row takes its place. Returns the row that moved into it (or -1)."""
        last = self.rows - 1
        if row != last:
            self.slot_of[row], self.length[row] = self.slot_of[last], self.length[last]
        self.slot_of.pop()
        self.length.pop()
        return last if row != last else -1


class OrtRows:
    """Rows of an ONNX Runtime backend's shared KV buffers (see the module docstring)."""

    def __init__(self, backend: Any, capacity: int | None = None):
        why = backend.rows_supported
        if why:
            raise GlmcError(why)
        self.backend = backend
        self.capacity = min(capacity or backend.max_batch, backend.max_batch)
        self.max_length = backend.max_length
        self.note: str | None = None
        self.padded = backend.padded
        self.views = backend.kv_row_views()
        self.table = _Table(self.capacity)
        self.mask = np.zeros((self.capacity, self.max_length), np.int64)  # padded form: positions each row holds
        self.edge = 0  # padded form: the common right edge T (next token lands at T)
        self.compactions = 0

    def add(self, ids: list[int]) -> tuple[int, torch.Tensor]:
        n = len(ids)
        slot, row = self.table.new(n)
        try:
            logits = self.backend.step_rows(torch.tensor([ids]), torch.arange(n)[None],
                                            torch.ones(1, n, dtype=torch.int64), first_row=row)
        except BaseException:
            self.table.drop(row)
            raise
        if self.padded:
            self.mask[row] = 0
            self.mask[row, :n] = 1
            self.edge = max(self.edge, n)
        return slot, logits[0]

    def add_many(self, prompts: list[list[int]]) -> list[tuple[int, torch.Tensor]]:
        """Several prompts in one forward (the padded form: left-padded into consecutive new rows, so each row's
        prompt ends at the batch's width W and its padding is a masked hole [0, W - n)); the unpadded form takes
        one forward per prompt."""
        if not self.padded or len(prompts) <= 1:
            return [self.add(p) for p in prompts]
        from glmc.runtime.generate import left_pad
        ids, mask, positions = left_pad(prompts)
        width = ids.shape[1]
        added = [self.table.new(len(p)) for p in prompts]
        first = added[0][1]
        try:
            logits = self.backend.step_rows(ids, positions, mask, first_row=first)
        except BaseException:
            for _ in added:
                self.table.drop(self.table.rows - 1)
            raise
        for (_, row), p in zip(added, prompts, strict=True):
            self.mask[row] = 0
            self.mask[row, width - len(p):width] = 1
        self.edge = max(self.edge, width)
        return [(slot, logits[i]) for i, (slot, _) in enumerate(added)]

    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        ordered = self.table.order(tokens)
        b = self.table.rows
        lengths = np.array(self.table.length, np.int64)
        if self.padded:
            if self.edge >= self.max_length:
                self._compact()
            self.mask[:b, self.edge] = 1
            mask = self.mask[:b, :self.edge + 1]
        else:
            width = int(lengths.max()) + 1
            mask = (np.arange(width)[None] <= lengths[:, None]).astype(np.int64)
        logits = self.backend.step_rows(torch.tensor(ordered)[:, None], torch.from_numpy(lengths)[:, None],
                                        torch.from_numpy(np.ascontiguousarray(mask)))
        if self.padded:
            self.edge += 1
        self.table.length = [n + 1 for n in self.table.length]
        return {s: logits[i] for i, s in enumerate(self.table.slot_of)}

    def remove(self, slot: int) -> None:
        row = self.table.row(slot)
        moved = self.table.drop(row)
        if moved >= 0:
            upto = self.edge if self.padded else self.table.length[row]
            for v in self.views:
                v[row, :, :upto] = v[moved, :, :upto]
            self.mask[row] = self.mask[moved]
        if self.table.rows == 0:
            self.edge = 0

    def _compact(self) -> None:
        """Padded form at the end of the buffer: gather each row's positions to its front; the edge becomes the
        longest row."""
        for row in range(self.table.rows):
            keep = torch.from_numpy(np.flatnonzero(self.mask[row, :self.edge]))
            n = len(keep)
            for v in self.views:
                v[row, :, :n] = v[row, :, keep.to(v.device)]
            self.mask[row] = 0
            self.mask[row, :n] = 1
        self.edge = max(self.table.length, default=0)
        self.compactions += 1
        if self.edge >= self.max_length:
            raise GlmcError(f"a row holds {self.edge} positions: the build's max_sequence_length is "
                            f"{self.max_length} (the scheduler ends a request before)")


class TorchRows:
    """Rows of the torch backend's concatenated cache [rows, Hkv, T, D] per layer, holes masked."""

    def __init__(self, backend: Any, capacity: int):
        self.backend = backend
        self.capacity = capacity
        self.max_length = backend.max_length
        self.note: str | None = None
        self.table = _Table(capacity)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.int64)
        self.compactions = 0

    @staticmethod
    def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
        extra = width - t.shape[-2] if t.dim() == 4 else width - t.shape[-1]
        if extra <= 0:
            return t
        if t.dim() == 4:
            return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2)
        return torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)

    def add(self, ids: list[int]) -> tuple[int, torch.Tensor]:
        n = len(ids)
        model = self.backend.model
        x = torch.tensor([ids])
        logits, cache = self.backend.forward(x, torch.arange(n)[None], torch.ones_like(x), model.empty_cache(1))
        slot, _ = self.table.new(n)
        if self.table.rows == 1:
            self.cache, self.mask = cache, torch.ones(1, n, dtype=torch.int64)
        else:
            w = max(self.mask.shape[1], n)
            self.cache = [(torch.cat([self._widen(k, w), self._widen(nk, w)]),
                           torch.cat([self._widen(v, w), self._widen(nv, w)]))
                          for (k, v), (nk, nv) in zip(self.cache, cache, strict=True)]
            self.mask = torch.cat([self._widen(self.mask, w), self._widen(torch.ones(1, n, dtype=torch.int64), w)])
        return slot, logits[0]

    def add_many(self, prompts: list[list[int]]) -> list[tuple[int, torch.Tensor]]:
        return [self.add(p) for p in prompts]

    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        ordered = self.table.order(tokens)
        if self.mask.shape[1] >= self.max_length:
            self._compact()
        mask = torch.cat([self.mask, torch.ones(self.table.rows, 1, dtype=torch.int64)], dim=1)
        positions = torch.tensor(self.table.length)[:, None]
        logits, self.cache = self.backend.forward(torch.tensor(ordered)[:, None], positions, mask, self.cache)
        self.mask = mask
        self.table.length = [n + 1 for n in self.table.length]
        return {s: logits[i] for i, s in enumerate(self.table.slot_of)}

    def remove(self, slot: int) -> None:
        row = self.table.row(slot)
        keep = [r for r in range(self.table.rows) if r != row]
        moved = self.table.drop(row)
        if moved >= 0:  # the table moved the last row into `row`: keep the tensors in the same order
            keep = keep[:row] + [moved] + keep[row:-1]
        index = torch.tensor(keep, dtype=torch.int64)
        dev = index.to(self.cache[0][0].device) if self.cache else index
        self.cache = [(k.index_select(0, dev), v.index_select(0, dev)) for k, v in self.cache]
        self.mask = self.mask.index_select(0, index)
        if self.table.rows == 0:
            self.cache, self.mask = [], torch.zeros(0, 0, dtype=torch.int64)
        else:  # positions no row holds any more
            used = torch.nonzero(self.mask.any(0)).flatten()
            if len(used) < self.mask.shape[1]:
                dev_used = used.to(self.cache[0][0].device)
                self.cache = [(k[:, :, dev_used], v[:, :, dev_used]) for k, v in self.cache]
                self.mask = self.mask[:, used]

    def _compact(self) -> None:
        width = max(self.table.length)
        order = torch.argsort(self.mask == 0, dim=1, stable=True)[:, :width]  # each row's positions first
        self.mask = torch.gather(self.mask, 1, order)
        idx = order.to(self.cache[0][0].device)[:, None, :, None]
        self.cache = [(torch.gather(k, 2, idx.expand(-1, k.shape[1], -1, k.shape[3])),
                       torch.gather(v, 2, idx.expand(-1, v.shape[1], -1, v.shape[3]))) for k, v in self.cache]
        self.compactions += 1


class OneRow:
    """Any generation-loop backend, one request at a time (its own cache per request)."""

    capacity = 1

    def __init__(self, backend: Any, note: str):
        self.backend = backend
        self.max_length = backend.max_length
        self.note: str | None = note
        self.slot = 0
        self.length = 0
        self.cache: Any = None

    def add(self, ids: list[int]) -> tuple[int, torch.Tensor]:
        if self.cache is not None:
            raise GlmcError("the one row is taken")
        x = torch.tensor([ids])
        logits, cache = self.backend.forward(x, torch.arange(len(ids))[None], torch.ones_like(x),
                                             self.backend.new_cache(1))
        self.cache, self.length = cache, len(ids)
        self.slot += 1
        return self.slot, logits[0]

    def add_many(self, prompts: list[list[int]]) -> list[tuple[int, torch.Tensor]]:
        return [self.add(p) for p in prompts]

    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        if set(tokens) != {self.slot} or self.cache is None:
            raise GlmcError(f"a step needs the token of slot {self.slot}")
        mask = torch.ones(1, self.length + 1, dtype=torch.int64)
        logits, self.cache = self.backend.forward(torch.tensor([[tokens[self.slot]]]),
                                                  torch.tensor([[self.length]]), mask, self.cache)
        self.length += 1
        return {self.slot: logits[0]}

    def remove(self, slot: int) -> None:
        self.cache, self.length = None, 0


def make_rows(backend: Any, max_batch: int | None = None) -> Rows:
    """The best Rows for a backend: in-flight batching where it can, else one request at a time (`note`)."""
    name = getattr(backend, "name", type(backend).__name__)
    limit = max_batch or getattr(backend, "max_batch", None) or 8
    if limit == 1:
        return OneRow(backend, "max batch 1: one request at a time")
    if name == "onnxruntime":
        why = backend.rows_supported
        if why is None:
            return OrtRows(backend, limit)
        return OneRow(backend, f"one request at a time: {why}")
    if name == "torch":
        return TorchRows(backend, limit)
    return OneRow(backend, f"one request at a time: the {name} backend has no per-row cache for in-flight batching")
