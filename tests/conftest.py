"""Test-wide settings: one torch thread (small tensors; no thread contention on busy machines)."""

import torch

torch.set_num_threads(1)
