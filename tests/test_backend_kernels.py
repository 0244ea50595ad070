"""The backend's Triton path computes what its torch path computes (and what the float64
reference says), and stores the same K/V: extend over compressed prefixes with compressed
and uncompressed segments in one batch, then decode, GQA 1 and 4, several head groups.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes. Two allocators
built from the same layout hand out the same slots for the same calls, so the torch
backend runs on one and the Triton backend on the other; their pools start poisoned
(NaN), as do the backend's output buffers and the decode workspace.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from backend_fakes import fake_batch, fake_layer, fake_runner  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

import tangram_sglang.backend as backend_module  # noqa: E402
from tangram_sglang.allocator import TangramAllocator, TangramKVPool  # noqa: E402
from tangram_sglang.backend import KERNELS_ENV, TangramAttnBackend, choose_kernels  # noqa: E402
from tangram_sglang.budget import BudgetRule  # noqa: E402
from tangram_sglang.layout import PoolLayout  # noqa: E402
from tangram_sglang.pool import RaggedPool  # noqa: E402
from tangram_sglang.reference import ragged_decode, ragged_extend  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DIM = 64 if CUDA else 16
LAYERS, GROUPS = 2, 3
RULE = BudgetRule(sink=2, window=3)
# ||out - ref|| / ||ref|| per (token, q head) row.
# On a GPU, Triton's fp32 tl.dot runs as TF32 (10-bit mantissa, ~1e-3 relative error:
# measured 1.5e-3 on the H100); the interpreter computes in full fp32.
TOL = {torch.float32: 5e-3 if CUDA else 1e-4, torch.bfloat16: 2.5e-2}


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

    def __init__(self, layout: PoolLayout, hq: int, dtype: torch.dtype, seed: int) -> None:
        self.hq, self.hkv, self.dtype, self.seed = hq, layout.num_kv_heads, dtype, seed
        self.allocators = [poisoned_allocator(layout, dtype) for _ in range(2)]
        torch_runner, triton_runner = (fake_runner(a, hq) for a in self.allocators)
        self.torch = TangramAttnBackend(torch_runner, kernels="torch")
        self.triton = TangramAttnBackend(
            triton_runner, kernels="triton", num_sms=random.randint(1, 6)
        )
        self.triton.triton.workspace.o_part.fill_(float("nan"))

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
        fb = fake_batch(ForwardMode.EXTEND, rows)
        self.torch.init_forward_metadata(fb)
        self.triton.init_forward_metadata(fb)
        prefix_lens = self.pool.group_lens.clone()
        for s in states[1].segments:
            prefix_lens[:, s.row] = torch.tensor(s.prefix_lens, dtype=torch.int32)
        for layer_id in range(LAYERS):
            q, k, v = self.qkv(sum(lens))
            view = dataclasses.replace(self.pool.layer_view(layer_id), group_lens=prefix_lens)
            expected = ragged_extend(q, k, v, lens, view, rows, DIM**-0.5)
            self.check("extend", layer_id, q, k, v, expected, lens)
        return new, states[1]

    def decode(self, rows):
        logical = [a.alloc(len(rows)) for a in self.allocators]
        for a, slots in zip(self.allocators, logical, strict=True):
            a.begin_decode(rows, slots)
        fb = fake_batch(ForwardMode.DECODE, rows)
        self.torch.init_forward_metadata(fb)
        self.triton.init_forward_metadata(fb)
        for layer_id in range(LAYERS):
            q, k, v = self.qkv(len(rows))
            self.check("decode", layer_id, q, k, v, None, rows)

    def check(self, what, layer_id, q, k, v, expected, detail):
        layer = fake_layer(layer_id, self.hq, self.hkv, DIM)
        mode = ForwardMode.EXTEND if what == "extend" else ForwardMode.DECODE
        outs = []
        for backend in (self.torch, self.triton):
            forward = backend.forward_extend if what == "extend" else backend.forward_decode
            flat = (x.reshape(len(x), -1) for x in (q, k, v))
            outs.append(forward(*flat, layer, fake_batch(mode, [])).view_as(q))
        if expected is None:  # decode: the reference reads the token both just wrote
            rows = list(self.triton.state.rows)
            expected = ragged_decode(q, self.pool.layer_view(layer_id), rows, DIM**-0.5)
        where = f"{what} layer {layer_id} {self.dtype} gqa {self.hq // self.hkv} {detail}"
        tol = TOL[self.dtype]
        assert_rows_close(outs[1], expected, tol, f"triton vs reference, {where}", self.seed)
        assert_rows_close(
            outs[1], outs[0].double(), 2 * tol, f"triton vs torch, {where}", self.seed
        )
        a, b = (alloc.pool for alloc in self.allocators)
        for name in ("k_storage", "v_storage"):
            mine, theirs = getattr(b, name)[layer_id], getattr(a, name)[layer_id]
            assert torch.equal(mine.isnan(), theirs.isnan()) and torch.equal(
                mine.nan_to_num(), theirs.nan_to_num()
            ), f"{where}: the Triton path stored other {name} than the torch path, seed {self.seed}"
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa", [1, 4])
def test_triton_path_matches_torch_path_and_reference(gqa, dtype, poisoned_outputs):
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    torch.manual_seed(seed)
    hkv = 4 if gqa == 1 else 2
    pair = Pair(random_layout(hkv), hkv * gqa, dtype, seed)
    none = torch.empty(0, dtype=torch.long)
    # Turn 1: a compressed segment, a short uncompressed one, a single token.
    lens = [random.randint(12, 30), random.randint(2, RULE.sink + RULE.window), 1]
    first, state = pair.extend([1, 2, 3], [none] * 3, lens)
    assert [s.compress for s in state.segments] == [True, False, False], f"seed {seed}"
    for _ in range(2):
        pair.decode([1, 2, 3])
    # Turn 2: compressed history (and a one-token history) as prefixes, in fresh rows.
    pair.extend([4, 5], [first[0], first[2]], [random.randint(10, 20), 1])
    # No segment compresses: the plain write path.
    pair.extend([6], [first[1]], [random.randint(1, RULE.sink + RULE.window)])
    pair.decode([4, 5, 6])


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
