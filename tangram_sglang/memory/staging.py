"""Host-to-device copies of a step's small host tables (rows, lengths, positions).

A copy from pageable host memory waits for the stream before it starts: on the GPU each
one stalls the host behind the running forward, which is what overlap scheduling hides.
`to_device` copies through pinned memory, non-blocking; PyTorch's caching host allocator
keeps the pinned block until the copy has run, so a block is never rewritten early.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without waiting for the device."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
