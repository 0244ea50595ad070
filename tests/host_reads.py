"""`HostReadGuard`: fail on anything that would make the host wait for a CUDA device.

A device sync shows only on CUDA (`torch.cuda.set_sync_debug_mode`), and these tests run
on CPU, where reading a tensor costs nothing. So the guard catches the calls that sync on
CUDA themselves, whatever the device:
- reads of tensor data: `.cpu()`, `.tolist()`, `.numpy()` (patched), `.item()` and
  bool/int/float of a tensor (`aten._local_scalar_dense`);
- ops whose output size depends on the data: nonzero, masked_select, unique, boolean-mask
  indexing, repeat_interleave with tensor repeats;
- tensors made from host data (`torch.tensor(...)`: `aten.lift_fresh`), a blocking
  host-to-device copy on CUDA.
It cannot see `.to(device)` of a host tensor (on CPU that is no copy at all).
`paused()` exempts a block, e.g. a kernel launch (asynchronous on CUDA; the Triton
interpreter reads its arguments on the host).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING_OPS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.nonzero_static,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.lift_fresh,
    aten.bincount,
}
INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
PATCHED = ("cpu", "tolist", "numpy")


class HostRead(AssertionError):
    """A call that would wait for the device on CUDA."""


class HostReadGuard(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.paused_depth = 0
        self.ops = 0  # ops seen while armed (a guard that saw nothing proves nothing)

    @contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1

    @contextmanager
    def armed(self, monkeypatch):
        """Guard the block: dispatched ops and the patched Tensor methods."""
        guard = self

        def refusing(name):
            real = getattr(torch.Tensor, name)

            def call(tensor, *args, **kwargs):
                if guard.paused_depth == 0:
                    raise HostRead(f"Tensor.{name}() reads the device on the host")
                return real(tensor, *args, **kwargs)

            return call

        with monkeypatch.context() as patch:
            for name in PATCHED:
                patch.setattr(torch.Tensor, name, refusing(name))
            with self:
                yield self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused_depth == 0:
            self.ops += 1
            packet = func.overloadpacket
            if packet in SYNCING_OPS:
                raise HostRead(f"{func} syncs with the device (host read or data-sized output)")
            if packet in INDEXING_OPS and _has_bool_index(args):
                raise HostRead(f"{func} with a boolean mask (a data-sized nonzero)")
            if packet is aten.repeat_interleave and _has_tensor_repeats(args):
                raise HostRead(f"{func} with tensor repeats (a data-sized output)")
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


def _has_tensor_repeats(args) -> bool:
    return len(args) == 1 or isinstance(args[1], torch.Tensor)
