"""Activation memory that autograd holds for backward, counted exactly.

:class:`SavedTensorMeter` registers every tensor saved for backward (by its storage, so a storage
saved by two ops counts once) from the moment it is saved until the graph holding it is freed,
and keeps the peak. It measures what a learning rule's step holds for its backward pass,
independently of the allocator: the block-by-block local rules hold the graph of one block (of one
micro-batch), end-to-end backprop the graph of the whole network.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "saved_activation_meter"]

class _Saved:
    """A tensor saved for backward; releases its count when the graph drops it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Bytes of activations that autograd graphs hold for backward, live and at their peak.

    Counted exactly with ``torch.autograd.graph.saved_tensors_hooks``: every tensor saved for
    backward is registered by its storage (a storage saved twice counts once) until the graph
    that holds it is freed. Storages of ``exclude`` (the parameters) are not counted.

    Use as a context manager around the steps to measure; read :attr:`peak_bytes`.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks: Any = None

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[ptr]

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._excluded:
            return tensor
        entry = self._live.setdefault(ptr, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.current_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        entry[1] += 1
        holder = _Saved(tensor)
        weakref.finalize(holder, self._release, ptr)
        return holder

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak_bytes = self.current_bytes

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None


@contextmanager
def saved_activation_meter(net: nn.Module, rule: nn.Module) -> Iterator[SavedTensorMeter]:
    """A :class:`SavedTensorMeter` that leaves out the parameters of ``net`` and ``rule``."""
    params = list(net.parameters()) + list(rule.parameters())
    with SavedTensorMeter(exclude=params) as meter:
        yield meter
