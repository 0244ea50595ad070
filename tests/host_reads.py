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

from tangram_sglang.memory import staging

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
FACTORIES = ("arange", "empty", "full", "ones", "zeros")


class HostRead(AssertionError):
    """A call that would wait for the device on CUDA."""


class _Watch(TorchDispatchMode):
    """A dispatch mode that watches ops, except inside `paused()` blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.paused_depth = 0
        self.ops = 0  # ops seen while watching (a watch that saw nothing proves nothing)

    @contextmanager
    def paused(self):
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1


class HostReadGuard(_Watch):
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


class SyncCounter(_Watch):
    """Counts, by call site, what would make the host wait for the GPU in a serving step,
    given which tensors live on the device there (`mark`): the pools, the allocator's maps,
    SGLang's batch tensors. On CPU every tensor is a host tensor, so device-ness is
    tracked instead: an op with a device input makes device outputs (views share it).

    - `read`: device data read on the host (`.item()`, `.tolist()`, `.cpu()`, `int()`),
      or an op whose output size depends on device data (nonzero, boolean masks, ...);
    - `h2d`: host data moved to the device (`.to(device)`, `torch.tensor(..., device=)`,
      host values written into a device tensor). From pageable memory such a copy waits
      for the stream before it starts;
    - `staged`: a copy through `tangram_sglang.memory.staging.to_device` (pinned,
      non-blocking: no wait), counted so that a staged copy turned pageable shows.

    A site is the innermost frame in the project (tangram_sglang/, patches/, kernels/);
    `paused()` exempts a block (kernel launches: the interpreter reads their arguments).
    """

    PROJECT = ("/tangram_sglang/", "/patches/", "/kernels/")

    def __init__(self) -> None:
        super().__init__()
        self.device: set[int] = set()
        self.kept: list[torch.Tensor] = []  # marked storages stay alive: no address reuse
        self.events: list[tuple[str, str]] = []  # (kind, site)

    def mark(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.numel():
                self.device.add(t.untyped_storage().data_ptr())
                self.kept.append(t)

    def on_device(self, t) -> bool:
        return (
            isinstance(t, torch.Tensor)
            and t.numel() > 0
            and t.untyped_storage().data_ptr() in self.device
        )

    def _record(self, kind: str) -> None:
        import traceback

        site = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename.replace("\\", "/")
            if any(part in path for part in self.PROJECT):
                site = f"{path.rsplit('/', 1)[-1]}:{frame.name}"
                break
        self.events.append((kind, site))

    @contextmanager
    def counting(self, monkeypatch):
        counter = self
        real_to, real_tensor = torch.Tensor.to, torch.tensor

        def reading(name):
            real = getattr(torch.Tensor, name)

            def call(tensor, *args, **kwargs):
                if counter.paused_depth == 0 and counter.on_device(tensor):
                    counter._record("read")
                return real(tensor, *args, **kwargs)

            return call

        def to(tensor, *args, **kwargs):
            out = real_to(tensor, *args, **kwargs)
            named = "device" in kwargs or any(isinstance(a, str | torch.device) for a in args)
            if counter.paused_depth == 0 and named and not counter.on_device(tensor):
                if tensor.numel():
                    counter._record("h2d")
                if out is not tensor:  # on CPU `.to("cpu")` is the host tensor itself
                    counter.mark(out)
            return out

        def tensor(data, *args, **kwargs):
            out = real_tensor(data, *args, **kwargs)
            if counter.paused_depth == 0 and kwargs.get("device") is not None:
                counter._record("h2d")
                counter.mark(out)
            return out

        def staged(host, device, real=staging.to_device):
            with counter.paused():  # its own pinned, non-blocking copy is not a wait
                out = real(host, device)
            if counter.paused_depth == 0:
                counter._record("staged")
                if out is host:  # on CPU: what the device copy would be, as its own tensor
                    with counter.paused():
                        out = host.clone()
                counter.mark(out)
            return out

        def made_on(factory):
            """A tensor made with an explicit `device=` is made there (no copy)."""

            def call(*args, **kwargs):
                out = factory(*args, **kwargs)
                if kwargs.get("device") is not None:
                    counter.mark(out)
                return out

            return call

        with monkeypatch.context() as patch:
            for name in PATCHED:
                patch.setattr(torch.Tensor, name, reading(name))
            patch.setattr(torch.Tensor, "to", to)
            patch.setattr(staging, "to_device", staged)
            for name in FACTORIES:
                patch.setattr(torch, name, made_on(getattr(torch, name)))
            patch.setattr(torch, "tensor", tensor)
            with self:
                yield self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused_depth:
            return out
        self.ops += 1
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs if self.on_device(t)]
        packet = func.overloadpacket
        if on_device:
            if _data_sized_or_read(packet, args):
                self._record("read")
            written = args[0] if packet in WRITING_OPS and args else None
            # 0-dim host values (a Python scalar) travel as kernel arguments, no copy, except
            # into index_put_ (`x[index] = 0`), which copies its value to the device first
            # (seen on the H100 under sync debug mode).
            scalar_ok = packet not in (aten.index_put_, aten._index_put_impl_)
            if self.on_device(written) and any(
                not self.on_device(t) and (t.dim() > 0 or not scalar_ok) and t.numel()
                for t in inputs[1:]
                if t.dtype != torch.bool
            ):
                self._record("h2d")
            self.mark(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
        return out


WRITING_OPS = {aten.copy_, aten.index_put_, aten._index_put_impl_, aten.index_copy_}


def _data_sized_or_read(packet, args) -> bool:
    """A host read of its input, or an output whose size depends on its input's data."""
    return (
        packet in SYNCING_OPS - {aten.lift_fresh}
        or (packet in INDEXING_OPS and _has_bool_index(args))
        or (packet is aten.repeat_interleave and _has_tensor_repeats(args))
    )
