"""The backend's Triton path computes what its torch path computes (and what the float64
reference says), and stores the same K/V: extend over compressed prefixes with compressed
and uncompressed segments in one batch, then decode, GQA 1 and 4, several head groups.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes. Two allocators
built from the same layout hand out the same slots for the same calls, so the torch
backend runs on one and the Triton backend on the other; their pools start poisoned
(NaN), as do the backend's output buffers and the decode workspace.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import random
import sys
import traceback
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import flashinfer_stub  # noqa: E402
from backend_fakes import fake_batch, fake_layer, fake_runner  # noqa: E402
from host_reads import HostRead, HostReadGuard, SyncCounter  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

import tangram_sglang.attention.backend as backend_module  # noqa: E402
from tangram_sglang.attention.aot_plan import AotPlan  # noqa: E402
from tangram_sglang.attention.backend import (  # noqa: E402
    KERNELS_ENV,
    FlashInferPath,
    KeptOwners,
    TangramAttnBackend,
    choose_kernels,
)
from tangram_sglang.attention.flashinfer_path import flashinfer_available  # noqa: E402
from tangram_sglang.attention.reference import ragged_decode, ragged_extend  # noqa: E402
from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool  # noqa: E402
from tangram_sglang.memory.budget import BudgetRule  # noqa: E402
from tangram_sglang.memory.layout import PoolLayout  # noqa: E402
from tangram_sglang.memory.pool import RaggedPool  # noqa: E402
from tangram_sglang.memory.ragged_kv import dequantize, quantize  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DIM = 64 if CUDA else 16
LAYERS, GROUPS = 2, 3
RULE = BudgetRule(sink=2, window=3)
# ||out - ref|| / ||ref|| per (token, q head) row.
# On a GPU, Triton's fp32 tl.dot runs as TF32 (10-bit mantissa, ~1e-3 relative error:
# measured 1.5e-3 on the H100); the interpreter computes in full fp32.
TOL = {torch.float32: 5e-3 if CUDA else 1e-4, torch.bfloat16: 2.5e-2}
FP8 = torch.float8_e4m3fn


def random_layout(num_kv_heads: int) -> PoolLayout:
    """Heads spread over the groups differently per layer; every group compresses."""
    heads = [[[] for _ in range(LAYERS)] for _ in range(GROUPS)]
    for layer in range(LAYERS):
        for h in range(num_kv_heads):
            heads[random.randrange(GROUPS)][layer].append(h)
    ratios = sorted(random.uniform(0.15, 0.9) for _ in range(GROUPS))
    groups = tuple(tuple(tuple(hs) for hs in g) for g in heads)
    return PoolLayout(LAYERS, num_kv_heads, DIM, groups, tuple(ratios))


def poisoned_allocator(layout: PoolLayout, dtype: torch.dtype) -> TangramAllocator:
    pool = RaggedPool(layout, [200] * GROUPS, dtype, DEVICE, 8, 128)
    for storage in pool.k_storage + pool.v_storage:
        storage.fill_(float("nan"))
    return TangramAllocator(400, TangramKVPool(pool, 400, "snapkv"), RULE)


class Pair:
    """The same forwards through a torch backend and a Triton backend (own pools each)."""

    def __init__(
        self,
        layout: PoolLayout,
        hq: int,
        dtype: torch.dtype,
        seed: int,
        kv_dtype: torch.dtype | None = None,
        scales: tuple[float, float] = (1.0, 1.0),
        kernels: str = "triton",
        num_sms: int | None = None,
    ) -> None:
        self.hq, self.hkv, self.dtype, self.seed = hq, layout.num_kv_heads, dtype, seed
        self.kv_dtype, self.scales = kv_dtype or dtype, scales
        self.allocators = [poisoned_allocator(layout, self.kv_dtype) for _ in range(2)]
        torch_runner, triton_runner = (fake_runner(a, hq) for a in self.allocators)
        self.torch = TangramAttnBackend(torch_runner, kernels="torch")
        self.triton = TangramAttnBackend(
            triton_runner, kernels=kernels, num_sms=num_sms or random.randint(1, 6)
        )
        self.triton.triton.workspace.o_part.fill_(float("nan"))
        self.guard = contextlib.nullcontext  # around each Triton extend forward call

    @property
    def pool(self) -> RaggedPool:
        return self.allocators[1].pool

    def qkv(self, tokens: int):
        def rand(heads):
            return torch.randn(tokens, heads, DIM, dtype=torch.float64).to(DEVICE, self.dtype)

        return rand(self.hq), rand(self.hkv), rand(self.hkv)

    def extend(self, rows, prefixes, lens):
        """One extend forward of both backends over every layer, checked; returns the new
        logical slots (the same in both allocators) and the forward state."""
        new, twin = ([a.alloc(n) for n in lens] for a in self.allocators)
        assert all(map(torch.equal, new, twin)), "the twin allocators diverged"
        states = [a.begin_extend(rows, prefixes, new) for a in self.allocators]
        for backend, state in zip((self.torch, self.triton), states, strict=True):
            backend.init_forward_metadata(fake_batch(ForwardMode.EXTEND, rows, state))
        prefix_lens = self.pool.group_lens.clone()
        for s in states[1].segments:
            prefix_lens[:, s.row] = torch.tensor(s.prefix_lens, dtype=torch.int32)
        for layer_id in range(LAYERS):
            q, k, v = self.qkv(sum(lens))
            view = dataclasses.replace(self.view(layer_id), group_lens=prefix_lens)
            # The Triton path attends the new tokens unquantized (SGLang's Triton extend),
            # the torch path as stored (torch_native reads them back from its pool).
            stored = [self.as_stored(x, s) for x, s in zip((k, v), self.scales, strict=True)]
            expected = (
                ragged_extend(q, *stored, lens, view, rows, DIM**-0.5),
                ragged_extend(q, k, v, lens, view, rows, DIM**-0.5),
            )
            self.check("extend", layer_id, q, k, v, expected, lens)
        a, b = (alloc.logical_to_group for alloc in self.allocators)
        assert torch.equal(a, b), (
            f"the Triton path re-owned group slots differently from the torch path, lens {lens} "
            f"seed {self.seed}"
        )
        return new, states[1]

    def decode(self, rows):
        logical = [a.alloc(len(rows)) for a in self.allocators]
        backends = (self.torch, self.triton)
        for a, backend, slots in zip(self.allocators, backends, logical, strict=True):
            state = a.begin_decode(rows, slots)
            backend.init_forward_metadata(fake_batch(ForwardMode.DECODE, rows, state))
        for layer_id in range(LAYERS):
            q, k, v = self.qkv(len(rows))
            self.check("decode", layer_id, q, k, v, None, rows)

    def view(self, layer_id: int):
        return self.pool.layer_view(layer_id, *self.scales)

    def as_stored(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """`x` as attention reads it back from the pool (float64)."""
        return dequantize(quantize(x, self.kv_dtype, scale), torch.float64, scale)

    def check(self, what, layer_id, q, k, v, expected, detail):
        """`expected`: the torch path's and the Triton path's reference outputs (decode:
        None, the same for both, from the K/V both just wrote)."""
        layer = fake_layer(layer_id, self.hq, self.hkv, DIM)
        layer.k_scale_float, layer.v_scale_float = self.scales
        mode = ForwardMode.EXTEND if what == "extend" else ForwardMode.DECODE
        outs = []
        for backend in (self.torch, self.triton):
            forward = backend.forward_extend if what == "extend" else backend.forward_decode
            flat = [x.reshape(len(x), -1) for x in (q, k, v)]
            batch = fake_batch(mode, [])
            guard = self.guard if backend is self.triton and what == "extend" else None
            with guard() if guard else contextlib.nullcontext():
                outs.append(forward(*flat, layer, batch).view_as(q))
        if expected is None:  # decode: the reference reads the token both just wrote
            rows = list(self.triton.state.rows)
            expected = (ragged_decode(q, self.view(layer_id), rows, DIM**-0.5),) * 2
        where = (
            f"{what} layer {layer_id} {self.dtype} kv {self.kv_dtype} scales {self.scales} "
            f"gqa {self.hq // self.hkv} {detail}"
        )
        tol = TOL[self.dtype]
        for name, out, ref in zip(("torch", "triton"), outs, expected, strict=True):
            assert_rows_close(out, ref, tol, f"{name} vs reference, {where}", self.seed)
        if self.kv_dtype == self.dtype:
            assert_rows_close(
                outs[1], outs[0].double(), 2 * tol, f"triton vs torch, {where}", self.seed
            )
        a, b = (alloc.pool for alloc in self.allocators)
        for name in ("k_storage", "v_storage"):
            mine, theirs = getattr(b, name)[layer_id], getattr(a, name)[layer_id]
            assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), (
                f"{where}: the Triton path stored other {name} bytes than the torch path, "
                f"seed {self.seed}"
            )
        allocator = self.allocators[1]
        assert torch.equal(allocator.row_lens, self.pool.group_lens.cpu().long()), (
            f"{where}: the pool's group_lens (what the kernels read) differ from the "
            f"allocator's row_lens, seed {self.seed}"
        )


def assert_rows_close(out, ref, tol, what, seed):
    out = out.cpu().double()
    ref = ref.cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN in the output, seed {seed}"
    assert not torch.isnan(ref).any(), f"{what}: the expected rows read unwritten K/V, seed {seed}"
    err = (out - ref).flatten(0, -2).norm(dim=-1)
    size = ref.flatten(0, -2).norm(dim=-1)
    bad = err > tol * size + 1e-6
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} rows off; worst relative error "
        f"{float((err / size.clamp_min(1e-12)).max()):.3g} > {tol}, seed {seed}"
    )


@pytest.fixture
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(backend_module, "_new_output", lambda q: torch.full_like(q, math.nan))


@pytest.mark.parametrize(
    "dtype, kv_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, FP8)],
    ids=["fp32", "bf16", "bf16-fp8-kv"],
)
@pytest.mark.parametrize("gqa", [1, 4])
def test_triton_path_matches_torch_path_and_reference(gqa, dtype, kv_dtype, poisoned_outputs):
    """An FP8 pool (with checkpoint-like scales) included: both paths quantize alike, read
    the stored values times the scales, and select from the unquantized K."""
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    hkv = 4 if gqa == 1 else 2
    scales = (random.uniform(0.3, 3.0), random.uniform(0.3, 3.0)) if kv_dtype else (1.0, 1.0)
    two_turns(Pair(random_layout(hkv), hkv * gqa, dtype, seed, kv_dtype, scales), seed)


def test_triton_path_on_a_tensor_parallel_rank_holding_no_head_of_a_group(poisoned_outputs):
    """TP rank 1's shard of a layout whose group 0 lives on rank 0 only: the group keeps
    its slots and has no storage (tangram's TP pools, docs/architecture.md)."""
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    full = random_layout(4)
    heads = [[list(h) for h in g] for g in full.heads]
    for layer in range(LAYERS):  # move rank 1's heads (2, 3) out of group 0
        moved = [h for h in heads[0][layer] if h >= 2]
        heads[0][layer] = [h for h in heads[0][layer] if h < 2]
        heads[1][layer] = sorted(heads[1][layer] + moved)
    groups = tuple(tuple(tuple(h) for h in g) for g in heads)
    shard = dataclasses.replace(full, heads=groups).shard(1, 2)
    assert not any(shard.heads[0]), f"seed {seed}: group 0 holds {shard.heads[0]} on rank 1"
    two_turns(Pair(shard, 2 * 2, torch.float32, seed, None, (1.0, 1.0)), seed)


def two_turns(pair: Pair, seed: int) -> None:
    """Compressed and plain extends, decodes, and a second turn on cut histories: both
    paths against each other and the reference at every step (`Pair` checks)."""
    none = torch.empty(0, dtype=torch.long)
    # Turn 1: compressed segments around a short uncompressed one and a single token.
    short = RULE.sink + RULE.window
    lens = [random.randint(12, 30), random.randint(2, short), 1, random.randint(12, 30)]
    first, state = pair.extend([1, 2, 3, 4], [none] * 4, lens)
    assert [s.compress for s in state.segments] == [True, False, False, True], f"seed {seed}"
    for _ in range(2):
        pair.decode([1, 2, 3, 4])
    # Turn 2: compressed history (a cut inside one, and a one-token history) as prefixes.
    cut = random.randint(1, lens[3] - 1)
    prefixes = [first[0], first[2], first[3][:cut]]
    pair.extend([5, 6, 7], prefixes, [random.randint(10, 20), 1, random.randint(6, 20)])
    # No segment compresses: the plain write path.
    pair.extend([8], [first[1]], [random.randint(1, short)])
    pair.decode([5, 6, 7, 8])


@pytest.mark.parametrize("gqa", [1, 4])
def test_flashinfer_path_decodes_what_the_torch_path_and_reference_do(
    gqa, poisoned_outputs, monkeypatch
):
    """`--tangram-kernels flashinfer`: decode through FlashInfer's paged decode with the AOT
    splits (extend on Triton). With CUDA and flashinfer, the library itself; elsewhere its
    stand-in (tests/flashinfer_stub.py) checks the metadata this path builds per step:
    one virtual request per split, page ids, last page lengths, empty chunks masked out of
    the merge."""
    if not flashinfer_available():
        if CUDA:
            pytest.skip("flashinfer is not installed")
        monkeypatch.setitem(sys.modules, "flashinfer", None)
        flashinfer_stub.install()
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    hkv = 4 if gqa == 1 else 2
    # FlashInfer itself has no fp32 kernels (the server refuses that pair); its stand-in does
    dtype = random.choice([torch.bfloat16] if CUDA else [torch.float32, torch.bfloat16])

    class SmallChunks(AotPlan):  # several splits per request, some of them empty
        @classmethod
        def build(cls, *args, **kwargs):
            return AotPlan.build(*args, **{**kwargs, "min_chunk": 4})

    monkeypatch.setattr(backend_module, "AotPlan", SmallChunks)
    pair = Pair(random_layout(hkv), hkv * gqa, dtype, seed, kernels="flashinfer", num_sms=32)
    assert isinstance(pair.triton.triton, FlashInferPath)
    for layer in range(LAYERS):  # padding slots hold finite values, as a serving pool's do
        for g in range(GROUPS):
            for name in ("k_buffer", "v_buffer"):
                values = torch.randn_like(getattr(pair.pool, name)(g, layer)[0], dtype=torch.float)
                for allocator in pair.allocators:
                    getattr(allocator.pool, name)(g, layer)[0] = values
    none = torch.empty(0, dtype=torch.long)
    lens = [random.randint(12, 30), random.randint(2, RULE.sink + RULE.window), 1]
    first, _ = pair.extend([1, 2, 3], [none] * 3, lens)
    for _ in range(2):
        pair.decode([1, 2, 3])
    pair.extend([4, 5], [first[0], first[2][:1]], [random.randint(10, 20), 1])
    pair.decode([5, 1, 4])
    decoder = pair.triton.triton.decoders[3]
    assert sorted(pair.triton.triton.decoders) == [3], "one FlashInfer instance per batch size"
    assert max(decoder.splits) > 1 and any(m.empty.any() for m in decoder.meta), (
        f"splits {decoder.splits}: no request was split, or no split was empty, seed {seed}"
    )


def test_triton_extend_layers_never_wait_for_the_device(monkeypatch):
    """Every layer of an extend forward (attention, scoring, selection, owners, scatter)
    issues device work only: no host read, no data-sized output, no tensor from host data
    (see tests/host_reads.py for why this is checked by the calls, on CPU). Exempt: kernel
    launches, and `KeptOwners.apply`, which runs once per forward after the last layer."""
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    pair = Pair(random_layout(2), 8, torch.float32, seed)
    guard = HostReadGuard()
    launches = []
    run = type(scatter_kernel()).run

    def launch(self, *args, **kwargs):
        launches.append(self.__name__)
        with guard.paused():
            return run(self, *args, **kwargs)

    def apply(owners, allocator, real=KeptOwners.apply):
        with guard.paused():
            real(owners, allocator)

    monkeypatch.setattr(type(scatter_kernel()), "run", launch)
    monkeypatch.setattr(KeptOwners, "apply", apply)
    pair.guard = lambda: guard.armed(monkeypatch)
    none = torch.empty(0, dtype=torch.long)
    short = RULE.sink + RULE.window
    lens = [random.randint(12, 30), random.randint(1, short), random.randint(12, 30), 1]
    state = pair.extend([1, 2, 3, 4], [none] * 4, lens)[1]
    assert [s.compress for s in state.segments] == [True, False, True, False], f"seed {seed}"
    assert guard.ops > 0 and launches.count("_scatter_kernel") == LAYERS, (
        f"the guard saw {guard.ops} ops and launches {launches}: it guarded nothing"
    )


def scatter_kernel():
    from tangram_sglang.kernels import scatter

    return scatter._scatter_kernel


@pytest.mark.parametrize(
    "read",
    [
        lambda x: x.sum().item(),
        lambda x: bool(x.any()),
        lambda x: int(x[0]),
        lambda x: x.cpu(),
        lambda x: x.tolist(),
        lambda x: x.numpy(),
        lambda x: x[x > 0],
        lambda x: x.nonzero(),
        lambda x: torch.unique(x),
        lambda x: torch.tensor([1, 2]),
        lambda x: torch.arange(3).repeat_interleave(x[:3].long().abs()),
    ],
    ids=["item", "bool", "int", "cpu", "tolist", "numpy", "mask", "nonzero", "unique", "tensor",
         "repeat_interleave"],
)  # fmt: skip
def test_the_host_read_guard_catches_every_kind_of_sync(read, monkeypatch):
    guard = HostReadGuard()
    x = torch.randn(8)
    with pytest.raises(HostRead), guard.armed(monkeypatch):
        read(x)
    with guard.armed(monkeypatch), guard.paused():
        read(x)  # exempt while paused
    read(x)  # and untouched once disarmed


def test_kernel_choice_follows_argument_then_env_then_device(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert choose_kernels(None, torch.device("cpu")) == "torch"
    assert choose_kernels(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv(KERNELS_ENV, "triton")
    assert choose_kernels(None, torch.device("cpu")) == "triton"
    assert choose_kernels("torch", torch.device("cpu")) == "torch"
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=KERNELS_ENV):
        choose_kernels(None, torch.device("cpu"))
    allocator = poisoned_allocator(random_layout(2), torch.float32)
    backend = TangramAttnBackend(fake_runner(allocator, 4), kernels="triton", num_sms=2)
    assert backend.triton is not None and backend.triton.plan.num_q_heads == 4


# What a serving step (2 requests, 3 groups, 2 layers) still makes the host wait for, by
# site (SyncCounter), measured 2026-12-05: nothing. No device read; every host table
# (rows, lengths, segment positions, selection layouts) reaches the device through a
# pinned, non-blocking copy (`staged`, counted so that one turned pageable shows). A new
# site, or more at a site, fails the test below; fewer is progress (lower the count here).
STEP_SYNCS = {
    "extend": {
        "staged allocator.py:_new_segments": 1,
        "staged allocator.py:assign_owners_batch": GROUPS,  # one per group, after the forward
        "staged allocator.py:_store_lens": 1,  # every row's lengths, one copy for the batch
        "staged allocator.py:_new_slot_tables": 1,  # where the new slots go, the same
        "staged backend.py:build": 1,
        "staged backend.py:stage": 3,
        "staged base.py:__init__": 11,
        "staged scatter.py:build": 3,
    },
    "decode": {
        "staged allocator.py:_store_lens": 1,
        "staged backend.py:stage": 1,
    },
}


def _device_tensors(obj) -> list[torch.Tensor]:
    """The tensors an object holds (one level, and inside lists and tuples)."""
    found = []
    for value in vars(obj).values():
        items = value if isinstance(value, list | tuple) else [value]
        found += [x for x in items if isinstance(x, torch.Tensor)]
    return found


def serving_step(pair, mode: str, rows, lens, counter=None) -> None:
    """One step of the Triton side as serving runs it: SGLang's logical allocation, the
    allocation hook, the forward's staging and every layer (`counter`: q/k/v marked as the
    device tensors SGLang hands the backend)."""
    allocator, backend = pair.allocators[1], pair.triton
    q, k, v = (
        torch.randn(sum(lens), heads * DIM, dtype=pair.dtype, device=DEVICE)  # made there
        for heads in (pair.hq, pair.hkv, pair.hkv)
    )
    if counter is not None:
        counter.mark(q, k, v)
    new = allocator.alloc(sum(lens))
    if mode == "extend":
        none = torch.empty(0, dtype=torch.long)
        state = allocator.begin_extend(rows, [none] * len(rows), list(new.split(lens)))
        batch = fake_batch(ForwardMode.EXTEND, rows, state)
    else:
        state = allocator.begin_decode(rows, new)
        batch = fake_batch(ForwardMode.DECODE, rows, state)
    backend.init_forward_metadata(batch)
    forward = backend.forward_extend if mode == "extend" else backend.forward_decode
    for layer_id in range(LAYERS):
        forward(q, k, v, fake_layer(layer_id, pair.hq, pair.hkv, DIM), batch)


def counted_pair(monkeypatch) -> tuple[int, Pair, SyncCounter]:
    """A seeded pair whose device tensors (pools, the allocator's maps and free lists, the
    Triton path's schedule and workspace) a `SyncCounter` tracks; kernel launches exempt."""
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    pair = Pair(random_layout(2), 8, torch.float32, seed)
    allocator, backend = pair.allocators[1], pair.triton
    pool, counter = allocator.pool, SyncCounter()
    counter.mark(
        *_device_tensors(pool),
        *pool.k_storage,
        *pool.v_storage,
        allocator.logical_to_group,  # (its row_lens and the ledger are host tensors)
        allocator.seg_pos,
        allocator.logical.free_pages,
        *(a.free_pages for a in pool.allocators),
        *_device_tensors(backend.triton.schedule),
        *_device_tensors(backend.triton.workspace),
    )
    run = type(scatter_kernel()).run

    def launch(self, *args, **kwargs):
        with counter.paused():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(type(scatter_kernel()), "run", launch)
    return seed, pair, counter


def by_site(events) -> dict[str, int]:
    """`SyncCounter` events counted as "kind site"."""
    return dict(collections.Counter(f"{kind} {site}" for kind, site in events))


def test_a_serving_steps_host_device_syncs_are_the_known_ones(monkeypatch):
    """One extend and two decode steps through the Triton path as serving runs them:
    SGLang's logical allocation, the allocation hook (`begin_extend` / `begin_decode`), the
    forward's staging (`init_forward_metadata`) and every layer. Counted on CPU by which
    tensors would be on the GPU (tests/host_reads.py `SyncCounter`); kernel launches exempt."""
    seed, pair, counter = counted_pair(monkeypatch)
    counts = {}
    with counter.counting(monkeypatch):
        for mode, lens in (("extend", [25, 3]), ("decode", [1, 1]), ("decode", [1, 1])):
            counter.events.clear()
            serving_step(pair, mode, [1, 2], lens, counter)
            counts[mode] = by_site(counter.events)
    assert counter.ops > 0, "the counter saw no op: it counted nothing"
    for mode, found in counts.items():
        waits = {s: n for s, n in found.items() if not s.startswith("staged")}
        assert not waits, f"seed {seed}: a {mode} step waits for the device: {waits}"
    for mode, found in counts.items():
        new = {s: n for s, n in found.items() if n > STEP_SYNCS[mode].get(s, 0)}
        assert not new, f"seed {seed}: new host-device syncs in a {mode} step: {new} (all: {found})"


# Waits the step test above never meets: an extend batch over radix prefixes and a finished
# request's free. How many group slots the logical slots map to is data (the owners): one
# read per batch or free (`_compact_batch`), where there was one per request and group. On
# the GPU each is a host-device sync that overlap scheduling cannot hide; to remove (issue
# 15) with host-side counts of the group slots a radix node holds (docs/architecture.md).
KNOWN_WAITS = {
    "prefix": {"read allocator.py:_compact_batch": 1},
    "finish": {"read allocator.py:_compact_batch": 1},
}


def test_a_prefix_hit_and_a_finish_wait_for_the_device_only_at_known_sites(monkeypatch):
    """Follow-up turns of several requests, extended as one batch over their radix
    prefixes, then a first turn's request freeing its tail, counted as
    `test_a_serving_steps_host_device_syncs_are_the_known_ones` counts
    (tests/host_reads.py `SyncCounter`): any wait beyond `KNOWN_WAITS` fails."""
    seed, pair, counter = counted_pair(monkeypatch)
    allocator = pair.allocators[1]
    rows = [1, 2, 3]
    firsts = [allocator.alloc(random.randint(20, 40)) for _ in rows]
    allocator.begin_extend(rows, [f[:0] for f in firsts], firsts)
    counts = {}
    with counter.counting(monkeypatch):
        counter.mark(*firsts)  # SGLang's radix values live on the device
        new = [allocator.alloc(random.randint(2, 8)) for _ in rows]
        allocator.begin_extend([4, 5, 6], firsts, new)
        counts["prefix"], counter.events[:] = by_site(counter.events), []
        allocator.free(firsts[0][-3:])
        counts["finish"] = by_site(counter.events)
    assert counter.ops > 0, "the counter saw no op: it counted nothing"
    for case, found in counts.items():
        waits = {s: n for s, n in found.items() if not s.startswith("staged")}
        allowed = KNOWN_WAITS[case]
        new_waits = {site: n for site, n in waits.items() if n > allowed.get(site, 0)}
        assert not new_waits, f"seed {seed}: new waits in the {case} case: {new_waits} ({waits})"


@pytest.mark.skipif(not CUDA, reason="CUDA's sync debug mode needs a GPU")
def test_a_decode_step_runs_under_cudas_sync_debug_mode():
    """On the GPU: the allocation hook, staging and every layer of a decode step make no
    synchronizing CUDA call (`torch.cuda.set_sync_debug_mode("warn")` warns on each one)."""
    pair = Pair(random_layout(2), 8, torch.bfloat16, random.randrange(10_000))
    serving_step(pair, "extend", [1, 2], [25, 3])
    serving_step(pair, "decode", [1, 2], [1, 1])  # compiles the kernels outside the check
    torch.cuda.synchronize()
    sites = []  # "warn" instead of "error": every synchronizing call in the step, not the first

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing CUDA operation" not in str(message):
            return  # e.g. the mode's own notice ("... does not yet detect all synchronizing")
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        callers = " <- ".join(f"{f.name}:{f.lineno}" for f in frames[-3:][::-1])
        sites.append(f"{message} at {callers}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            serving_step(pair, "decode", [1, 2], [1, 1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not sites, "synchronizing calls in a decode step:\n" + "\n".join(sites)
