"""Extend (prefill) attention of one layer on the GPU: SGLang's Triton extend kernel
(`extend_attention_fwd`, what stock's `--attention-backend triton` runs) against ours
(`kernels/extend.py`) on the same K/V bytes: full KV (ratio 1.0), a Qwen3-4B layer (32 q /
8 kv heads, head_dim 128) in 4 head groups of 2 heads, as the e2e parity servers run it.

Why: on the load that fits stock's pool, tangram 1.0 ran at 0.82x stock and 0.25 at 0.91x
(bench/results/gpu-2026-12-06-h100.md) while stock without prefill CUDA graphs ran as fast
as with them, so the gap is not graphs. This times the kernel both servers run per layer
per prefill batch, at the parity load's shapes, for each of our launch variants (BLOCK_M,
BLOCK_N, warps, stages), to say how much of the gap is the extend kernel.

    python bench/extend_kernels.py --out results.json      (a CUDA machine with sglang)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics

import torch
from tangram_sglang.kernels.extend import extend_attention

from tangram_sglang.memory.ragged_kv import RaggedKV

HQ, HKV, DIM, GROUPS = 32, 8, 128, 4
# (batch, new tokens, prefix tokens): the parity load's prefill batches (a chunk of first
# turns after the shared system prompt; follow-up turns over their whole history)
POINTS = ((6, 1280, 0), (8, 1024, 256), (32, 256, 1400), (64, 128, 2000))
VARIANTS = ((64, 64, 4, 1), (128, 64, 8, 1), (128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2))


def time_us(fn, reps: int = 30) -> float:
    """Median wall time of `fn` on the device, in microseconds (CUDA events, warmed up)."""
    if not torch.cuda.is_available():  # the CPU dry run (TRITON_INTERPRET=1): runs, untimed
        fn()
        return float("nan")
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def point(batch: int, new: int, prefix: int, dev: str, dtype=torch.bfloat16) -> dict:
    """Both kernels on one batch; returns times and the largest output difference."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    total = batch * new
    q = torch.randn(total, HQ, DIM, device=dev, dtype=dtype)
    k_new = torch.randn(total, HKV, DIM, device=dev, dtype=dtype)
    v_new = torch.randn(total, HKV, DIM, device=dev, dtype=dtype)
    slots = batch * prefix + 1  # slot 0 is padding, as in SGLang's pool
    # Stock: one flat [slots, Hkv, D] buffer, each request's prefix at random slots.
    k_flat = torch.randn(slots, HKV, DIM, device=dev, dtype=dtype)
    v_flat = torch.randn(slots, HKV, DIM, device=dev, dtype=dtype)
    perm = torch.randperm(slots - 1, device=dev)[: batch * prefix] + 1
    kv_indices = perm.to(torch.int64)
    kv_indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * prefix
    qo_indptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * new
    out_stock = torch.empty_like(q)
    scale = DIM**-0.5

    def stock():
        extend_attention_fwd(
            q,
            k_new,
            v_new,
            out_stock,
            k_flat,
            v_flat,
            qo_indptr,
            kv_indptr,
            kv_indices,
            None,
            True,
            None,
            new,
            1.0,
            1.0,
            scale,
        )

    # Ours: 4 groups of 2 heads, each group's rows interleaved by head (the pool's layout),
    # holding the same values at the same slots.
    heads = [list(range(2 * g, 2 * g + 2)) for g in range(GROUPS)]
    k_rows = torch.empty(slots * HKV, DIM, device=dev, dtype=dtype)
    v_rows = torch.empty_like(k_rows)
    group, base, stride = (torch.zeros(HKV, dtype=torch.int64) for _ in range(3))
    for g, members in enumerate(heads):
        for j, h in enumerate(members):
            group[h], base[h], stride[h] = g, g * slots * 2 + j, 2
            rows = base[h] + torch.arange(slots, device=dev) * 2
            k_rows[rows] = k_flat[:, h]
            v_rows[rows] = v_flat[:, h]
    req_to_slot = torch.zeros(GROUPS, batch + 1, max(prefix, 1), device=dev, dtype=torch.int32)
    req_to_slot[:, 1:, :prefix] = perm.view(batch, prefix).to(torch.int32)
    group_lens = torch.full((GROUPS, batch + 1), prefix, device=dev, dtype=torch.int32)
    kv = RaggedKV(
        k_rows, v_rows, group.to(dev), base.to(dev), stride.to(dev), req_to_slot, group_lens
    )
    rows = torch.arange(1, batch + 1, device=dev, dtype=torch.int32)
    lens = torch.full((batch,), new, device=dev, dtype=torch.int32)
    out_ours = torch.empty_like(q)
    result = {"batch": batch, "new": new, "prefix": prefix, "stock_us": time_us(stock)}
    for bm, bn, warps, stages in VARIANTS:

        def ours(bm=bm, bn=bn, warps=warps, stages=stages):
            extend_attention(
                q,
                k_new,
                v_new,
                lens,
                kv,
                rows,
                scale,
                new,
                out=out_ours,
                block_m=bm,
                block_n=bn,
                num_warps=warps,
                num_stages=stages,
            )

        name = f"m{bm}-n{bn}-w{warps}-s{stages}"
        try:
            result[name] = time_us(ours)
            result[f"{name}_max_diff"] = float((out_ours - out_stock).abs().max())
        except Exception as e:  # a variant that does not fit the SM's shared memory
            result[name] = None
            result[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="extend-kernels.json")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny points on the CPU (TRITON_INTERPRET=1)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    points = ((2, 16, 0), (2, 8, 24)) if args.dry_run else POINTS
    dev = "cpu" if args.dry_run else "cuda"
    rows = [point(*p, dev, dtype=torch.float32 if args.dry_run else torch.bfloat16) for p in points]
    names = [f"m{bm}-n{bn}-w{w}-s{s}" for bm, bn, w, s in VARIANTS]
    print("| batch x new (prefix) | stock us | " + " | ".join(names) + " |")
    print("|---" * (2 + len(names)) + "|")
    for r in rows:
        cells = [
            "-" if r[n] is None else f"{r[n]:.0f} ({r['stock_us'] / r[n]:.2f}x)" for n in names
        ]
        print(
            f"| {r['batch']} x {r['new']} ({r['prefix']}) | {r['stock_us']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    record = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"hq": HQ, "hkv": HKV, "dim": DIM, "groups": GROUPS, "dtype": "bfloat16"},
        "points": rows,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
