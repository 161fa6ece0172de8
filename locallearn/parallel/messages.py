"""What passes between the stages of a pipeline (``torch.distributed`` point-to-point).

Messages go forward only (stage ``k`` to ``k + 1``) during an epoch; at evaluations and
checkpoints every stage sends its blocks' state to rank 0. A message is any picklable object
(dicts, lists, numbers) holding tensors; the tensors travel through the CPU and keep their
values bit for bit and their memory layout (channels-last maps stay channels-last, so the
receiving block runs the same kernels as in one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["END", "gather_to_main", "recv", "send", "to_device"]

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


def send(obj: Any, dst: int) -> None:
    """Send ``obj`` to rank ``dst`` (returns once it is on its way)."""
    dist.send_object_list([to_device(obj, "cpu")], dst)


def recv(src: int, device: torch.device | str) -> Any:
    """Receive an object sent by rank ``src``; its tensors land on ``device``."""
    box: list[Any] = [None]
    dist.recv_object_list(box, src)
    return to_device(box[0], device)


def gather_to_main(obj: Any, rank: int, world: int, device: torch.device | str) -> list[Any]:
    """Every rank's ``obj``, in rank order, on rank 0 (other ranks get ``[]``)."""
    if rank != 0:
        send(obj, 0)
        return []
    return [obj] + [recv(src, device) for src in range(1, world)]
