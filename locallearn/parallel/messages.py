"""What passes between the stages of a pipeline (``torch.distributed`` point-to-point).

Messages go forward (stage ``k`` to ``k + 1``) during an epoch, and with late signals from the
top (``parallel.feedback_delay``) one tensor per batch goes from the last stage to every other,
without waiting for the receiver (:func:`post`, :func:`take`); at evaluations and checkpoints
every stage sends its blocks' state to rank 0. A message is any picklable object
(dicts, lists, numbers) holding tensors; its structure is pickled and its tensors are sent as
they lie in memory (point-to-point, without a copy), so they keep their values bit for bit and
their memory layout (channels-last maps stay channels-last, so the receiving block runs the same
kernels as in one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["END", "gather_to_main", "post", "recv", "send", "settle", "take", "to_device"]

#: The message that ends an epoch.
END = "end-of-epoch"


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


def send(obj: Any, dst: int) -> None:
    """Send ``obj`` to rank ``dst``: its structure pickled, its tensors as they are in memory
    (no copy; on the device with NCCL)."""
    tensors: list[torch.Tensor] = []
    meta = _pack(obj, tensors)
    dist.send_object_list([meta], dst)
    wire = _wire_device()
    for t in tensors:
        dist.send(t.to(wire), dst)


def recv(src: int, device: torch.device | str) -> Any:
    """Receive an object sent by rank ``src``; its tensors land on ``device``."""
    box: list[Any] = [None]
    dist.recv_object_list(box, src)
    slots: list[_Slot] = []
    _collect(box[0], slots)
    tensors: list[torch.Tensor] = [torch.empty(0)] * len(slots)
    for slot in sorted(slots, key=lambda s: s.index):
        buf = torch.empty(slot.shape, dtype=slot.dtype, device=_wire_device())
        dist.recv(buf, src)
        tensors[slot.index] = buf.to(device)
    return _unpack(box[0], tensors)


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


#: the dtypes a posted tensor may have (its header names one by its place here)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32,
           torch.uint8, torch.bool)
_HEADER = 8  # dtype, number of dims, up to six sizes


def post(tensor: torch.Tensor, dst: int) -> list[Any]:
    """Send one tensor to rank ``dst`` without waiting for the receiver; returns what must stay
    alive until the sends complete (call ``wait()`` on the handles it holds, :func:`settle`)."""
    t = tensor.detach().contiguous().to(_wire_device())
    if t.dim() > _HEADER - 2 or t.dtype not in _DTYPES:
        raise ValueError(f"cannot post a tensor of {t.dim()} dims and dtype {t.dtype}")
    head = torch.zeros(_HEADER, dtype=torch.int64)
    head[0], head[1] = _DTYPES.index(t.dtype), t.dim()
    head[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    head = head.to(_wire_device())
    return [dist.isend(head, dst), dist.isend(t, dst), head, t]


def take(src: int, device: torch.device | str) -> torch.Tensor:
    """Receive the next tensor that rank ``src`` posted to this rank."""
    head = torch.empty(_HEADER, dtype=torch.int64, device=_wire_device())
    dist.recv(head, src)
    code, dims = int(head[0]), int(head[1])
    shape = [int(v) for v in head[2 : 2 + dims]]
    buf = torch.empty(shape, dtype=_DTYPES[code], device=_wire_device())
    dist.recv(buf, src)
    return buf.to(device)


def settle(posted: list[list[Any]]) -> None:
    """Wait until every posted send has completed, then forget them."""
    for item in posted:
        for handle in item[:2]:
            handle.wait()
    posted.clear()
