"""Decode of the backend's Triton path under SGLang's CUDA-graph protocol: capture-time
metadata for every captured batch size, then replays whose real batch is padded to the
captured size.

Without a GPU nothing is captured; instead every kernel launch (under TRITON_INTERPRET=1)
is recorded with its grid, scalars and each tensor's address, shape and strides. A graph
replays exactly the launches it captured, so a replay is right if (1) the eager forward
after replay-time metadata launches the same kernels with the same arguments as the
capture did (same static buffers, refilled in place), and (2) that forward computes the
step: real rows equal the float64 reference and the torch path, padded rows are zero,
and padded entries write only the dummy slot of each group. A forward must also do
nothing a graph cannot hold: no host reads, no tensors but views (and the output).
On a GPU the last test captures and replays a real CUDA graph.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from backend_fakes import fake_batch, fake_layer
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from test_backend_kernels import (
    CUDA,
    DEVICE,
    DIM,
    LAYERS,
    TOL,
    Pair,
    assert_rows_close,
    random_layout,
)

import tangram_sglang.attention.backend as backend_module
from tangram_sglang.attention.reference import ragged_decode

# aten ops a forward may run outside its kernel launches: views of existing tensors.
VIEW_OPS = {
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.reshape.default",
    "aten.select.int",
    "aten.slice.Tensor",
    "aten.expand.default",
    "aten.as_strided.default",
    "aten.alias.default",
}
interpreted = pytest.mark.skipif(CUDA, reason="records launches of the Triton interpreter")


class LaunchRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Inside `with`: every Triton launch as (kernel, grid, arguments), tensors by address,
    shape, strides and dtype; and every aten op or host read of a tensor outside launches."""

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        from triton.runtime.interpreter import GridExecutor

        self.launches: list[tuple] = []
        self.ops: list[str] = []
        self.host_reads: list[str] = []
        self._in_launch = False
        launch = GridExecutor.__call__
        recorder = self

        def recorded(executor, *args, **kwargs):
            recorder.launches.append(
                (executor.fn.__name__, executor.grid, tuple(map(_describe, args)))
                + tuple(sorted((k, _describe(v)) for k, v in kwargs.items()))
            )
            recorder._in_launch = True
            try:
                with torch.utils._python_dispatch._disable_current_modes():
                    return launch(executor, *args, **kwargs)
            finally:
                recorder._in_launch = False

        monkeypatch.setattr(GridExecutor, "__call__", recorded)
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "cpu", "numpy"):
            monkeypatch.setattr(
                torch.Tensor, name, self._host_read(name, getattr(torch.Tensor, name))
            )

    def _host_read(self, name, original):
        def read(tensor, *args, **kwargs):
            if self._active and not self._in_launch:
                self.host_reads.append(name)
            return original(tensor, *args, **kwargs)

        return read

    _active = False

    def __enter__(self):
        self.launches, self.ops, self.host_reads, self._active = [], [], [], True
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _describe(arg):
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.data_ptr(), tuple(arg.shape), arg.stride(), arg.dtype)
    return arg


class GraphRunner:
    """What SGLang's decode graph runner does to the backend, with graph-static q/k/v
    inputs and (per batch size and layer) output buffers, as a captured graph has."""

    def __init__(self, pair: Pair, max_bs: int, monkeypatch) -> None:
        self.pair, self.backend = pair, pair.triton
        self.backend.init_cuda_graph_state(max_bs, max_bs)
        self.max_bs = max_bs
        shape = (max_bs, pair.hq + 2 * pair.hkv, DIM)
        self.qkv = torch.full(shape, math.nan, dtype=pair.dtype, device=DEVICE)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.captured: dict[int, list] = {}
        self.current: tuple[int, int] | None = None
        monkeypatch.setattr(backend_module, "_new_output", self._output)
        self.recorder = LaunchRecorder(monkeypatch)

    def _output(self, like: torch.Tensor) -> torch.Tensor:
        if self.current is None:  # not a graph forward (the torch twin)
            return torch.full_like(like, math.nan)
        if self.current not in self.outputs:  # the graph pool's memory, not the forward's
            with torch.utils._python_dispatch._disable_current_modes():
                self.outputs[self.current] = torch.full_like(like, math.nan)
        return self.outputs[self.current]

    def _forward(self, bs: int) -> list[torch.Tensor]:
        """Every layer's decode of the graph's first `bs` tokens, recorded."""
        q, k, v = self.qkv[:bs].split([self.pair.hq, self.pair.hkv, self.pair.hkv], dim=1)
        for (size, _), out in self.outputs.items():
            if size == bs:
                out.fill_(math.nan)  # in place: the graph's output addresses stay
        outs = []
        with self.recorder:
            for layer_id in range(LAYERS):
                self.current = (bs, layer_id)
                layer = fake_layer(layer_id, self.pair.hq, self.pair.hkv, DIM)
                out = self.backend.forward_decode(
                    q.reshape(bs, -1), k.reshape(bs, -1), v.reshape(bs, -1), layer, None
                )
                outs.append(out.view(bs, self.pair.hq, DIM))
        self.current = None
        unexpected = set(self.recorder.ops) - VIEW_OPS
        assert not unexpected, f"forward_decode ran {unexpected} outside its kernels"
        assert not self.recorder.host_reads, f"forward_decode read {self.recorder.host_reads}"
        return outs

    def capture(self, bs: int) -> None:
        self.backend.init_forward_metadata_out_graph(_capture_batch(bs), in_capture=True)
        self.qkv[:bs].normal_()
        before = _storages(self.pair.pool)
        outs = self._forward(bs)
        self.captured[bs] = list(self.recorder.launches)
        for layer_id, out in enumerate(outs):
            assert torch.equal(out, torch.zeros_like(out)), (
                f"capture at batch {bs}, layer {layer_id}: a padded entry read K/V "
                f"(seed {self.pair.seed})"
            )
        _check_only_dummy_slots_changed(self.pair.pool, before, f"capture at batch {bs}")

    def replay(self, rows: list[int], bs: int) -> None:
        """One decode step of `rows` through the graph of batch `bs`, checked."""
        pair, seed = self.pair, self.pair.seed
        states = [a.begin_decode(rows, a.alloc(len(rows))) for a in pair.allocators]
        pair.torch.init_forward_metadata(fake_batch(ForwardMode.DECODE, rows, states[0]))
        padded = rows + [0] * (bs - len(rows))
        view = SimpleNamespace(
            forward_mode=ForwardMode.DECODE,
            actual_forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            num_padding=bs - len(rows),
            req_pool_indices=torch.tensor(padded, device=DEVICE),
            tangram_state=states[1],
        )
        self.backend.init_forward_metadata_out_graph(view)
        self.qkv[:bs].normal_()
        before = _storages(pair.pool)
        outs = self._forward(bs)
        assert self.recorder.launches == self.captured[bs], (
            f"replay of rows {rows} at batch {bs}: the launches differ from the captured "
            f"ones (a graph would replay stale or freed buffers), seed {seed}"
        )
        q, k, v = self.qkv[: len(rows)].split([pair.hq, pair.hkv, pair.hkv], dim=1)
        for layer_id, out in enumerate(outs):
            where = f"replay of rows {rows} at batch {bs}, layer {layer_id}"
            layer = fake_layer(layer_id, pair.hq, pair.hkv, DIM)
            flat = (x.reshape(len(rows), -1) for x in (q, k, v))
            eager = pair.torch.forward_decode(*flat, layer, None).view(len(rows), pair.hq, DIM)
            expected = ragged_decode(q, pair.pool.layer_view(layer_id), rows, DIM**-0.5)
            assert_rows_close(out[: len(rows)], expected, TOL[pair.dtype], where, seed)
            assert_rows_close(out[: len(rows)], eager.double(), 2 * TOL[pair.dtype], where, seed)
            assert torch.equal(out[len(rows) :], torch.zeros_like(out[len(rows) :])), (
                f"{where}: a padded entry read K/V, seed {seed}"
            )
        changed = _check_only_dummy_slots_changed(pair.pool, before, "replay", real_rows=True)
        assert changed or len(rows) == bs, f"replay at batch {bs}: padding wrote nothing"
        _assert_twin_storages_equal(pair, f"replay of rows {rows} at batch {bs}")


def _storages(pool) -> list[torch.Tensor]:
    return [s.clone() for s in pool.k_storage + pool.v_storage]


def _dummy_rows(pool, layer: int) -> torch.Tensor:
    """Storage rows of the padding slots (0..page-1 of every group) in `layer`."""
    rows = []
    for g in range(pool.num_groups):
        n = len(pool.heads_in(g, layer))
        base = pool.base_row[layer][g]
        rows += range(base, base + pool.page_size * n)
    return torch.tensor(rows, dtype=torch.long, device=pool.device)


def _check_only_dummy_slots_changed(pool, before, what, real_rows=False) -> bool:
    """Outside the dummy slots the storages changed only where real rows wrote (if
    `real_rows`; else nowhere); the dummy slots' rows are re-poisoned for the twin
    comparison. Returns whether any dummy row changed."""
    changed = False
    storages = pool.k_storage + pool.v_storage
    for i, (now, was) in enumerate(zip(storages, before, strict=True)):
        layer = i % pool.num_layers
        dummy = _dummy_rows(pool, layer)
        diff = ~((now == was) | (now.isnan() & was.isnan())).all(-1)
        outside = diff.clone()
        outside[dummy] = False
        if not real_rows:
            assert not outside.any(), (
                f"{what}: rows {outside.nonzero().flatten().tolist()} of a real slot changed"
            )
        changed |= bool(diff[dummy].any())
        now[dummy] = math.nan
    return changed


def _assert_twin_storages_equal(pair, what):
    """Real slots hold exactly what the torch twin wrote (its padding rows stay NaN)."""
    a, b = (alloc.pool for alloc in pair.allocators)
    for name in ("k_storage", "v_storage"):
        for layer in range(LAYERS):
            mine, theirs = getattr(b, name)[layer], getattr(a, name)[layer]
            assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(
                mine.nan_to_num(), theirs.nan_to_num()
            ), f"{what}: layer {layer} {name} differs from the torch path, seed {pair.seed}"
    assert torch.equal(b.group_lens[:, 0], torch.zeros_like(b.group_lens[:, 0])), (
        f"{what}: the padding row 0 gained a length, seed {pair.seed}"
    )


def _pair(gqa: int, dtype: torch.dtype) -> tuple[Pair, list[torch.Tensor]]:
    """Twin backends after one extend of rows 1..5 (a compressed prompt among them)."""
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    hkv = 4 if gqa == 1 else 2
    pair = Pair(random_layout(hkv), hkv * gqa, dtype, seed)
    none = torch.empty(0, dtype=torch.long)
    lens = [random.randint(12, 30)] + [random.randint(1, 8) for _ in range(4)]
    first, _ = pair.extend([1, 2, 3, 4, 5], [none] * 5, lens)
    return pair, first


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa", [1, 4])
def test_replays_padded_to_the_captured_batch_decode_the_real_rows(gqa, dtype, monkeypatch):
    pair, _ = _pair(gqa, dtype)
    runner = GraphRunner(pair, max_bs=4, monkeypatch=monkeypatch)
    for bs in (4, 2, 1):  # SGLang captures the largest first
        runner.capture(bs)
    rows = random.sample([1, 2, 3, 4, 5], 3)
    runner.replay(rows, 4)  # one padded entry
    runner.replay(rows[:1], 2)
    runner.replay(rows[:2], 2)  # no padding
    # A batch above max_bs runs eagerly in between; graphs still replay afterwards.
    monkeypatch.undo()
    pair.decode([1, 2, 3, 4, 5])
    runner = _rearm(runner, monkeypatch)
    runner.replay(random.sample([1, 2, 3, 4, 5], 3), 4)


def _rearm(runner: GraphRunner, monkeypatch) -> GraphRunner:
    """The same runner with its recording patches applied again (after `undo`)."""
    monkeypatch.setattr(backend_module, "_new_output", runner._output)
    runner.recorder = LaunchRecorder(monkeypatch)
    return runner


@interpreted
def test_a_decode_forward_allocates_only_its_output(monkeypatch):
    """With SGLang's own output allocation (graph-pool memory inside a capture)."""
    pair, _ = _pair(4, torch.float32)
    pair.triton.init_cuda_graph_state(4, 4)
    rows = [2, 5]
    states = [a.begin_decode(rows, a.alloc(len(rows))) for a in pair.allocators]
    view = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        actual_forward_mode=ForwardMode.DECODE,
        batch_size=4,
        num_padding=2,
        req_pool_indices=torch.tensor([*rows, 0, 0], device=DEVICE),
        tangram_state=states[1],
    )
    pair.triton.init_forward_metadata_out_graph(view)
    q, k, v = pair.qkv(4)
    recorder = LaunchRecorder(monkeypatch)
    with recorder:
        for layer_id in range(LAYERS):
            layer = fake_layer(layer_id, pair.hq, pair.hkv, DIM)
            pair.triton.forward_decode(
                q.reshape(4, -1), k.reshape(4, -1), v.reshape(4, -1), layer, None
            )
    allocations = [op for op in recorder.ops if op not in VIEW_OPS]
    assert allocations == ["aten.empty_like.default"] * LAYERS, (
        f"a decode forward must allocate its output only, ran {allocations}"
    )
    assert not recorder.host_reads, f"a decode forward read the device: {recorder.host_reads}"
    assert len(recorder.launches) == 3 * LAYERS, "expected scatter, split and merge per layer"


def _capture_batch(bs: int, mode: ForwardMode = ForwardMode.DECODE) -> SimpleNamespace:
    """The dummy batch SGLang's runner hands the backend before capturing `bs` tokens."""
    return SimpleNamespace(
        forward_mode=mode,
        batch_size=bs,
        req_pool_indices=torch.zeros(bs, dtype=torch.int64, device=DEVICE),
    )


@interpreted
def test_graph_metadata_refuses_what_a_graph_cannot_serve():
    pair, _ = _pair(1, torch.float32)
    backend = pair.triton
    with pytest.raises(RuntimeError, match="init_cuda_graph_state"):
        backend.init_forward_metadata_out_graph(_capture_batch(2), in_capture=True)
    backend.init_cuda_graph_state(2, 2)
    for mode in (ForwardMode.EXTEND, ForwardMode.TARGET_VERIFY, ForwardMode.MIXED):
        with pytest.raises(NotImplementedError, match="captures decode batches only"):
            backend.init_forward_metadata_out_graph(_capture_batch(2, mode), in_capture=True)
    with pytest.raises(ValueError, match="outside 1..2"):
        backend.init_forward_metadata_out_graph(_capture_batch(3), in_capture=True)
    # A replay of more real rows than its batch's allocation is refused.
    states = [a.begin_decode([1], a.alloc(1)) for a in pair.allocators]
    view = SimpleNamespace(
        forward_mode=ForwardMode.DECODE,
        actual_forward_mode=ForwardMode.DECODE,
        batch_size=2,
        num_padding=0,
        req_pool_indices=torch.tensor([1, 3], device=DEVICE),
        tangram_state=states[1],
    )
    with pytest.raises(RuntimeError, match="no matching allocation state"):
        backend.init_forward_metadata_out_graph(view)
    with pytest.raises(NotImplementedError, match="torch path cannot run in CUDA graphs"):
        pair.torch.init_cuda_graph_state(2, 2)


@pytest.mark.skipif(not CUDA, reason="captures a real CUDA graph")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_captured_cuda_graph_replays_padded_decode_steps(dtype):
    pair, _ = _pair(4, dtype)
    backend, bs = pair.triton, 4
    backend.init_cuda_graph_state(bs, bs)
    qkv = torch.zeros((bs, pair.hq + 2 * pair.hkv, DIM), dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([pair.hq, pair.hkv, pair.hkv], dim=1)
    layers = [fake_layer(i, pair.hq, pair.hkv, DIM) for i in range(LAYERS)]

    def forward():
        flat = [x.reshape(bs, -1) for x in (q, k, v)]
        return [backend.forward_decode(*flat, layer, None) for layer in layers]

    backend.init_forward_metadata_out_graph(_capture_batch(bs), in_capture=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()  # compiles the kernels before the capture, as SGLang's warm-up does
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = forward()
    for real in (3, 1):
        rows = random.sample([1, 2, 3, 4, 5], real)
        states = [a.begin_decode(rows, a.alloc(real)) for a in pair.allocators]
        pair.torch.init_forward_metadata(fake_batch(ForwardMode.DECODE, rows, states[0]))
        view = SimpleNamespace(
            forward_mode=ForwardMode.DECODE,
            actual_forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            num_padding=bs - real,
            req_pool_indices=torch.tensor(rows + [0] * (bs - real), device=DEVICE),
            tangram_state=states[1],
        )
        backend.init_forward_metadata_out_graph(view)
        qkv.normal_()
        before = _storages(pair.pool)
        graph.replay()
        torch.cuda.synchronize()
        q_real, k_real, v_real = (x[:real] for x in (q, k, v))
        for layer, out in zip(layers, outs, strict=True):
            where = f"graph replay of rows {rows}, layer {layer.layer_id}, {dtype}"
            out = out.view(bs, pair.hq, DIM)
            flat = (x.reshape(real, -1) for x in (q_real, k_real, v_real))
            eager = pair.torch.forward_decode(*flat, layer, None).view(real, pair.hq, DIM)
            view_kv = pair.pool.layer_view(layer.layer_id)
            expected = ragged_decode(q_real, view_kv, rows, DIM**-0.5)
            assert_rows_close(out[:real], expected, TOL[dtype], where, pair.seed)
            assert_rows_close(out[:real], eager.double(), 2 * TOL[dtype], where, pair.seed)
            assert torch.equal(out[real:], torch.zeros_like(out[real:])), (
                f"{where}: a padded entry read K/V, seed {pair.seed}"
            )
        _check_only_dummy_slots_changed(pair.pool, before, "graph replay", real_rows=True)
        _assert_twin_storages_equal(pair, f"graph replay of rows {rows}")
