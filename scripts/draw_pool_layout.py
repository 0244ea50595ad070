"""Draw docs/pool_layout.png: the ragged storage and the request ledger, from real objects.

The numbers in the picture (base rows, head tables, logical and group slots, request
tables, reservations) are read from a `RaggedPool` and the `TangramAllocator` that
serving runs over it, driven through the same calls serving makes (reserve and bind at
admission, `begin_extend`, `assign_owners`, `begin_decode`), so the figure cannot drift
from the code. On a CPU-only machine SGLang's import needs the test stand-ins:

    PYTHONPATH=tangram_sglang/cpu/shims .venv/bin/python scripts/draw_pool_layout.py
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool

GROUP_COLORS = [(66, 133, 244), (52, 168, 83), (234, 140, 0)]
PADDING = (200, 200, 200)
CELL_W, CELL_H = 34, 34
RULE = BudgetRule(sink=1, window=1)
PROMPTS = {"A": (1, 2), "B": (2, 6)}  # request: (row, prompt tokens)
# Where B's compressed groups end up after the forward: per group slot, the latest
# position its heads keep there (what the backend's `KeptOwners` reports); None: group 2
# keeps every token, so its slots stay 1:1.
B_OWNERS = ([0, 3, 5], [0, 2, 4, 5], None)


@dataclass
class Example:
    """The drawn state: the allocator, request B's logical slots (prompt, then decoded),
    its prompt's mapping right after `begin_extend`, and the ledger after each step."""

    allocator: TangramAllocator
    logical: torch.Tensor
    at_allocation: torch.Tensor
    ledger: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def pool(self) -> RaggedPool:
        return self.allocator.pool


def example() -> Example:
    """2 layers, 4 kv heads, 3 groups with different head counts per layer. Requests A
    (2 tokens) and B (6 tokens) are admitted together, extended in one batch, and decode
    one token each."""
    heads = (((0, 2), (1,)), ((1,), (0, 3)), ((3,), (2,)))
    layout = PoolLayout(2, 4, 8, heads, (0.25, 0.5, 1.0))
    pool = RaggedPool(layout, [8, 9, 11], torch.float16, "cpu", 2, 8)
    a = TangramAllocator(16, TangramKVPool(pool, 16), RULE)
    ledger = []

    def record(step: str) -> None:
        ledger.append((step, a.budget.reserved(), pool.free_slots()))

    record("start")
    for rid, (row, n) in PROMPTS.items():
        a.budget.reserve(rid, a.budget.prompt_need(n))
        a.budget.bind(rid, row)
    record("admission: reserve prompt_need(n), bind to the row")
    prompts = [a.alloc(n) for _, n in PROMPTS.values()]
    rows = [row for row, _ in PROMPTS.values()]
    state = a.begin_extend(rows, [p[:0] for p in prompts], prompts)
    at_allocation = a.logical_to_group[:, prompts[1]].clone()
    record("begin_extend: the batch takes exactly the kept slots")
    owners = [None if o is None else torch.tensor(o) for o in B_OWNERS]
    a.assign_owners(state.segments[1], owners)
    decoded = a.alloc(len(rows))
    a.begin_decode(rows, decoded)
    record("begin_decode: one slot per group and row, from free")
    return Example(a, torch.cat((prompts[1], decoded[1:])), at_allocation, ledger)


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("", "/usr/share/fonts/truetype/dejavu/"):
        try:
            return ImageFont.truetype(folder + name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def tint(color: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    """Blend `color` toward white by `amount` (0 = color, 1 = white)."""
    return tuple(int(c + (255 - c) * amount) for c in color)


def centered(draw: ImageDraw.ImageDraw, box, text: str, fnt, fill=(0, 0, 0)) -> None:
    x0, y0, x1, y1 = box
    w, h = draw.textbbox((0, 0), text, font=fnt)[2:]
    draw.text(((x0 + x1 - w) / 2, (y0 + y1 - h) / 2 - 1), text, font=fnt, fill=fill)


def cell(draw, x: int, y: int, text: str, fill, outline=(150, 150, 150), width: int = 1) -> None:
    draw.rectangle((x, y, x + CELL_W - 2, y + CELL_H), fill=fill, outline=outline, width=width)
    centered(draw, (x, y, x + CELL_W, y + CELL_H), text, font(12))


def draw_layer(draw, ex: Example, layer: int, x: int, y: int) -> int:
    """One layer's K storage as a strip of rows; returns the y below it."""
    pool = ex.pool
    small, label, bold = font(12), font(14), font(15, bold=True)
    rows = pool.k_storage[layer].shape[0]
    draw.text(
        (x, y),
        f"layer {layer}: k_storage[{layer}]  [{rows} rows, head_dim]  (v_storage identical)",
        font=bold,
        fill=(0, 0, 0),
    )
    y += 46
    cx = x
    P = pool.page_size
    row_a, row_b = PROMPTS["A"][0], PROMPTS["B"][0]
    held_a = [set(s.tolist()) for s in ex.allocator.row_slots(row_a)]
    held_b = [set(s.tolist()) for s in ex.allocator.row_slots(row_b)]
    for g in range(pool.num_groups):
        members = pool.heads_in(g, layer)
        n = len(members)
        count = pool.slots[g] + P
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        if n:
            draw.text(
                (cx + 2, y - 22),
                f"group {g}: base_row {pool.base_row[layer][g]}, view [{count}, {n}, D]",
                font=label,
                fill=color,
            )
        for s in range(count):
            for j, h in enumerate(members):
                x0 = cx + (s * n + j) * CELL_W
                if s < P:
                    fill = PADDING
                elif s in held_a[g] or s in held_b[g]:
                    fill = tint(color, 0.45)
                else:
                    fill = tint(color, 0.85)
                draw.rectangle(
                    (x0, y, x0 + CELL_W - 1, y + CELL_H), fill=fill, outline=(255, 255, 255)
                )
                centered(draw, (x0, y, x0 + CELL_W, y + CELL_H), f"h{h}", small)
            if n and s in held_b[g]:
                sx = cx + s * n * CELL_W
                draw.rectangle((sx, y, sx + n * CELL_W - 1, y + CELL_H), outline=(0, 0, 0), width=2)
            if n:
                sx = cx + s * n * CELL_W
                draw.line(
                    (sx, y + CELL_H + 2, sx + n * CELL_W - 4, y + CELL_H + 2), fill=color, width=2
                )
                centered(
                    draw,
                    (sx, y + CELL_H + 4, sx + n * CELL_W, y + CELL_H + 20),
                    f"s{s}",
                    small,
                    fill=(60, 60, 60),
                )
        cx += count * n * CELL_W
    return y + CELL_H + 34


def draw_head_tables(draw, pool: RaggedPool, x: int, y: int) -> int:
    mono, bold = font(14), font(15, bold=True)
    draw.text(
        (x, y),
        "per-head tables:  row of kv head h at slot s = head_base[l, h] + s * head_stride[l, h]",
        font=bold,
        fill=(0, 0, 0),
    )
    y += 26
    for layer in range(pool.num_layers):
        cells = "   ".join(
            f"h{h}: g{int(pool.head_group[layer, h])} base {int(pool.head_base[layer, h]):>2} "
            f"stride {int(pool.head_stride[layer, h])}"
            for h in range(pool.layout.num_kv_heads)
        )
        draw.text((x, y), f"layer {layer}   {cells}", font=mono, fill=(30, 30, 30))
        y += 22
    return y + 16


def draw_mapping(draw, ex: Example, x: int, y: int) -> int:
    """Request B's logical slots and, per group, the group slot each one owns: right after
    `begin_extend` (the last k_g own them) and after the forward (`assign_owners`)."""
    label, bold = font(14), font(15, bold=True)
    row = PROMPTS["B"][0]
    n = PROMPTS["B"][1]
    mapping = ex.allocator.logical_to_group[:, ex.logical]
    draw.text(
        (x, y),
        f"request B, row {row}: logical slots (SGLang's req_to_token) own group slots "
        "(logical_to_group[g], blank: none)",
        font=bold,
        fill=(0, 0, 0),
    )
    y += 26
    x0 = x + 190
    for c in range(ex.logical.numel()):
        text = f"t{c}" if c < n else f"d{c - n}"
        centered(draw, (x0 + c * CELL_W, y, x0 + (c + 1) * CELL_W, y + 16), text, font(12))
    y += 18
    draw.text((x, y + 8), f"req_to_token[{row}]", font=label, fill=(30, 30, 30))
    for c, logical in enumerate(ex.logical.tolist()):
        cell(draw, x0 + c * CELL_W, y, str(logical), (235, 235, 235))
    y += CELL_H + 10
    for g in range(ex.pool.num_groups):
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        for when, values, amount in (
            ("at begin_extend", ex.at_allocation[g].tolist(), 0.7),
            ("after the forward", mapping[g].tolist(), 0.0),
        ):
            draw.text((x, y + 8), f"group {g} {when}", font=label, fill=color)
            for c in range(ex.logical.numel()):
                slot = values[c] if c < len(values) else 0
                fill = tint(color, amount) if slot else (248, 248, 248)
                cell(draw, x0 + c * CELL_W, y, str(slot) if slot else "", fill)
            y += CELL_H + 4
        y += 6
    return y


def draw_rows(draw, ex: Example, x: int, y: int) -> int:
    """Request B's per-group row: the group slots attention reads, and `group_lens`."""
    label, bold, small = font(14), font(15, bold=True), font(13)
    row = PROMPTS["B"][0]
    pool = ex.pool
    draw.text((x, y), f"req_to_slot[g, {row}, :max_context]", font=bold, fill=(0, 0, 0))
    y += 26
    for g in range(pool.num_groups):
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        lens = int(pool.group_lens[g, row])
        draw.text((x, y + 8), f"group {g}", font=label, fill=color)
        for c in range(pool.max_context):
            text = str(int(pool.req_to_slot[g, row, c])) if c < lens else ""
            cell(draw, x + 70 + c * CELL_W, y, text, color if c < lens else (248, 248, 248))
        tx = x + 70 + pool.max_context * CELL_W + 12
        draw.text((tx, y + 8), f"group_lens = {lens}", font=label, fill=(30, 30, 30))
        y += CELL_H + 10
    for line in (
        "attention reads req_to_slot[g, r, :group_lens[g, r]]: the group slots of the",
        "row's logical slots, in order (outlined in the storage above).",
        "A decoded token gets one slot in every group; a row interleaves with other",
        "requests' slots, and the tree keeps the slots after the request leaves.",
    ):
        draw.text((x, y), line, font=small, fill=(60, 60, 60))
        y += 19
    return y


def draw_ledger(draw, ex: Example, x: int, y: int) -> int:
    """The reservation ledger beside the pools, after each step of the example."""
    label, bold, small = font(14), font(15, bold=True), font(13)
    G = ex.pool.num_groups
    draw.text(
        (x, y),
        "reservation ledger (BudgetReservation, on the allocator): prompt slots reserved at "
        "admission, consumed by the extend; decode slots topped up per step from free",
        font=bold,
        fill=(0, 0, 0),
    )
    y += 28
    step_w, col = 430, 44

    def box(column: int, g: int, top: int, bottom: int) -> tuple[int, int, int, int]:
        left = x + step_w + column * (G * col + 30) + g * col
        return left, top, left + col - 4, bottom

    for column, name in enumerate(("reserved", "free")):
        draw.text(box(column, 0, y, y)[:2], name, font=label, fill=(30, 30, 30))
        for g in range(G):
            color = GROUP_COLORS[g % len(GROUP_COLORS)]
            centered(draw, box(column, g, y + 18, y + 34), f"g{g}", small, color)
    y += 38
    for step, reserved, free in ex.ledger:
        draw.text((x, y + 8), step, font=label, fill=(30, 30, 30))
        for column, values in enumerate((reserved, free)):
            for g, v in enumerate(values):
                color = GROUP_COLORS[g % len(GROUP_COLORS)]
                b = box(column, g, y, y + CELL_H - 4)
                draw.rectangle(b, fill=tint(color, 0.8), outline=(150, 150, 150))
                centered(draw, b, str(v), label)
        y += CELL_H + 2
    capacity = ", ".join(str(s) for s in ex.pool.slots)
    draw.text(
        (x, y + 4),
        f"capacity per group: {capacity}. A decode step first makes room for one slot per "
        "group and row beside the prompt reservations (make_decode_room evicts the shortfall).",
        font=small,
        fill=(60, 60, 60),
    )
    return y + 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/pool_layout.png"))
    args = parser.parse_args()
    ex = example()
    image = Image.new("RGB", (1440, 1400), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (20, 14),
        "RaggedPool storage (page_size 1: slot 0 of every group is padding, grey; "
        "shaded: held by requests A and B, B's outlined)",
        font=font(18, bold=True),
        fill=(0, 0, 0),
    )
    y = 56
    for layer in range(ex.pool.num_layers):
        y = draw_layer(draw, ex, layer, 20, y)
    y = draw_head_tables(draw, ex.pool, 20, y)
    bottom = draw_mapping(draw, ex, 20, y)
    right = draw_rows(draw, ex, 20 + 190 + 8 * CELL_W + 60, y + 44)
    y = draw_ledger(draw, ex, 20, max(bottom, right) + 16)
    image = image.crop((0, 0, image.width, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
