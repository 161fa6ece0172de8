"""What passes between the stages of a pipeline (``torch.distributed`` point-to-point).

Messages go forward (stage ``k`` to ``k + 1``) during an epoch, posted without waiting for the
receiver (:func:`post_object`; a stage keeps at most :data:`IN_FLIGHT` of them under way, so a
stage that is a little faster for a batch or two does not stop for the next one), and with late
signals from the top (``parallel.feedback_delay``) one tensor per batch goes from the last stage
to every other, also posted without waiting; :func:`recv` takes either. At evaluations and
checkpoints every stage sends its blocks' state to rank 0 (:func:`send`, which waits). A message
is any picklable object (dicts, lists, numbers) holding tensors; its structure is pickled and its
tensors are sent as they lie in memory (point-to-point, without a copy), so they keep their
values bit for bit and their memory layout (channels-last maps stay channels-last, so the
receiving block runs the same kernels as in one process).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["END", "IN_FLIGHT", "Posted", "gather_to_main", "post_object", "recv", "send",
           "settle", "to_device"]

#: The message that ends an epoch.
END = "end-of-epoch"

#: How many forward messages a stage keeps under way before it waits for the oldest.
IN_FLIGHT = 2


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it moved to ``device`` (layout kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@dataclass(frozen=True)
class _Slot:
    """Where a tensor of a message was: its place in the tensor list, and its layout."""

    index: int
    shape: tuple[int, ...]  # of the tensor in memory order (dims sorted by stride)
    dtype: torch.dtype
    order: tuple[int, ...]  # the permutation that put it in memory order


def _pack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a :class:`_Slot`; the tensors, in memory order
    (a view, no copy, for dense tensors of any layout), appended to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        order = tuple(sorted(range(obj.dim()), key=lambda d: -obj.stride(d)))
        flat = obj.detach().permute(order)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        tensors.append(flat)
        return _Slot(len(tensors) - 1, tuple(flat.shape), flat.dtype, order)
    if isinstance(obj, dict):
        return {k: _pack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v, tensors) for v in obj)
    return obj


def _unpack(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        inverse = [0] * len(obj.order)
        for i, d in enumerate(obj.order):
            inverse[d] = i
        return tensors[obj.index].permute(inverse)
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v, tensors) for v in obj)
    return obj


class Posted:
    """Sends under way: their handles, and the tensors that must stay alive (unchanged) until
    they complete."""

    def __init__(self, handles: list[Any], keep: list[torch.Tensor]):
        self.handles, self.keep = handles, keep

    def wait(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles, self.keep = [], []


def send(obj: Any, dst: int) -> None:
    """Send ``obj`` to rank ``dst`` and wait until it has gone (:func:`post_object`)."""
    post_object(obj, dst).wait()


def post_object(obj: Any, dst: int) -> Posted:
    """Send ``obj`` to rank ``dst`` without waiting for the receiver: its structure pickled,
    its tensors as they are in memory (no copy; on the device with NCCL). Sends to one rank
    arrive in the order they were posted; :func:`recv` takes them."""
    tensors: list[torch.Tensor] = []
    meta = _pack(obj, tensors)
    wire = _wire_device()
    data = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(wire)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=wire)
    keep = [size, payload, *(t.to(wire) for t in tensors)]
    return Posted([dist.isend(t, dst) for t in keep], keep)


def recv(src: int, device: torch.device | str) -> Any:
    """Receive an object sent by rank ``src``; its tensors land on ``device``."""
    wire = _wire_device()
    size = torch.empty(1, dtype=torch.int64, device=wire)
    dist.recv(size, src)
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=wire)
    dist.recv(payload, src)
    meta = pickle.loads(payload.cpu().numpy().tobytes())
    slots: list[_Slot] = []
    _collect(meta, slots)
    tensors: list[torch.Tensor] = [torch.empty(0)] * len(slots)
    for slot in sorted(slots, key=lambda s: s.index):
        buf = torch.empty(slot.shape, dtype=slot.dtype, device=wire)
        dist.recv(buf, src)
        tensors[slot.index] = buf.to(device)
    return _unpack(meta, tensors)


def _wire_device() -> torch.device:
    """Where tensors travel: the current GPU with NCCL, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collect(obj: Any, slots: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        slots.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, slots)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, slots)


def gather_to_main(obj: Any, rank: int, sources: list[int],
                   device: torch.device | str) -> list[Any]:
    """Rank 0's ``obj`` and that of every rank in ``sources``, in that order, on rank 0 (the
    other ranks get ``[]``; ranks that are neither send nothing)."""
    if rank != 0:
        if rank in sources:
            send(obj, 0)
        return []
    return [obj] + [recv(src, device) for src in sources]


def settle(posted: list[Posted], keep: int = 0) -> None:
    """Wait until all but the newest ``keep`` of ``posted`` have completed, and forget them."""
    while len(posted) > keep:
        posted.pop(0).wait()
