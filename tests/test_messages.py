"""Messages between pipeline stages: posted without waiting, received in order, bit for bit,
with their memory layout."""

import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locallearn.parallel import messages


def _message(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(3, 4, 5, 6, generator=g).contiguous(memory_format=torch.channels_last)
    return {"i": i, "name": f"batch {i}", "x": x, "parts": [torch.arange(i + 1), (i, 2.5)]}


def _pair(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        if rank == 0:  # posts far ahead of a slow receiver, keeping IN_FLIGHT under way
            sent: list[messages.Posted] = []
            for i in range(6):
                sent.append(messages.post_object(_message(i), 1))
                messages.settle(sent, keep=messages.IN_FLIGHT)
                assert len(sent) <= messages.IN_FLIGHT
            sent.append(messages.post_object(messages.END, 1))
            messages.settle(sent)
            assert sent == []
        else:
            time.sleep(0.3)
            got = []
            while (msg := messages.recv(0, "cpu")) != messages.END:
                got.append(msg)
            torch.save(got, out)
    finally:
        dist.destroy_process_group()


def test_posted_messages_arrive_in_order_bit_for_bit(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "got.pt")
    mp.spawn(_pair, args=(init, out), nprocs=2, join=True)
    got = torch.load(out)
    assert [m["i"] for m in got] == list(range(6))
    for i, m in enumerate(got):
        want = _message(i)
        assert m["name"] == want["name"] and m["parts"][1] == (i, 2.5)
        assert torch.equal(m["x"], want["x"]) and torch.equal(m["parts"][0], want["parts"][0])
        assert m["x"].is_contiguous(memory_format=torch.channels_last)
