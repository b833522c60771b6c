"""The packed work list: how a plan reaches the kernels (one int32 array, one host-to-device copy).

A work list is a sequence of *sections*; a section is ``rows`` records of ``len(fields)`` int32 values
(array of structs), zero-padded to its capacity. :class:`WorkListLayout` owns the order, the offsets and
the record widths; the kernels get each section as a pointer and its record width (the *stride*) as a
``tl.constexpr``, and read the fields in the order the layout names them. Batch decode's layout is
:func:`decode_layout`; batch prefill's is in prefill_work.py (``COUNT_FIELDS`` ...).

Host-side numpy only (no Triton): packing runs once per plan(), where a numpy op costs about a
microsecond whatever the batch, far less than torch ops on tiny CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["Section", "WorkListLayout", "decode_layout", "DECODE_ITEM_FIELDS", "pack_decode_worklist"]


@dataclass(frozen=True)
class Section:
    name: str
    fields: tuple  # field names, in record order
    rows: int  # capacity in records


class WorkListLayout:
    """Offsets (in int32 elements) and record widths of a work list's sections."""

    def __init__(self, sections: Sequence[Section]) -> None:
        self.sections = tuple(sections)
        self._offset: Dict[str, int] = {}
        offset = 0
        for s in self.sections:
            self._offset[s.name] = offset
            offset += s.rows * len(s.fields)
        self.size = offset

    def offset(self, name: str) -> int:
        return self._offset[name]

    def stride(self, name: str) -> int:
        """int32 values per record of section ``name`` (the kernels' constexpr stride)."""
        return len(self._section(name).fields)

    def _section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    def pack(self, records: Dict[str, npt.ArrayLike], pin: bool = False) -> torch.Tensor:
        """The host int32 array: each section's flat record values (``rows * stride`` at most, fields in
        order) at its offset, zeros elsewhere. ``pin``: page-locked (an asynchronous copy source)."""
        flat = np.zeros(self.size, dtype=np.int32)
        for s in self.sections:
            given = records.get(s.name)
            if given is None:
                continue
            values = np.asarray(given).reshape(-1)
            if values.size > s.rows * len(s.fields):
                raise ValueError(f"work list section {s.name}: {values.size} values exceed its capacity "
                                 f"{s.rows} x {len(s.fields)}")
            o = self._offset[s.name]
            flat[o: o + values.size] = values
        host = torch.from_numpy(flat)
        return host.pin_memory() if pin else host

    def view(self, worklist: torch.Tensor, name: str) -> torch.Tensor:
        """Section ``name`` of a packed work list as a ``[rows, stride]`` view."""
        s = self._section(name)
        o = self._offset[name]
        return worklist[o: o + s.rows * len(s.fields)].view(s.rows, len(s.fields))


# Batch decode: request r's items are item_indptr[r]:item_indptr[r + 1] (entry B: the planned item count),
# its KV length kv_lens[r]; item w covers keys [kv_start, kv_end) of its request.
DECODE_ITEM_FIELDS = ("request", "kv_start", "kv_end")


def decode_layout(batch_size: int, item_capacity: int) -> WorkListLayout:
    return WorkListLayout([Section("item_indptr", ("first_item",), batch_size + 1),
                           Section("kv_lens", ("kv_len",), batch_size),
                           Section("items", DECODE_ITEM_FIELDS, item_capacity)])


def pack_decode_worklist(layout: WorkListLayout, item_indptr: npt.ArrayLike, kv_lens: npt.ArrayLike,
                         item_request: npt.ArrayLike, item_kv_start: npt.ArrayLike, item_kv_end: npt.ArrayLike,
                         pin: bool = False) -> torch.Tensor:
    """Batch decode's work list (host int32) from the split-KV plan (int sequences or numpy arrays)."""
    items = np.stack([np.asarray(item_request), np.asarray(item_kv_start), np.asarray(item_kv_end)], axis=1)
    return layout.pack({"item_indptr": item_indptr, "kv_lens": kv_lens, "items": items}, pin=pin)
