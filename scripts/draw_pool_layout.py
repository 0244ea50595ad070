"""Draw docs/pool_layout.png: the ragged storage of a small RaggedPool, from the pool itself.

The numbers in the picture (base rows, head tables, request slots) are read from a real
`RaggedPool`, so the figure cannot drift from the code. On a CPU-only machine SGLang's
import needs the test stand-ins:

    PYTHONPATH=tangram_sglang/cpu/shims .venv/bin/python scripts/draw_pool_layout.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from tangram_sglang.layout import PoolLayout
from tangram_sglang.pool import RaggedPool

GROUP_COLORS = [(66, 133, 244), (52, 168, 83), (234, 140, 0)]
PADDING = (200, 200, 200)
CELL_W, CELL_H = 40, 34


def example_pool() -> RaggedPool:
    """2 layers, 4 kv heads, 3 groups with different head counts per layer, page 2."""
    heads = (((0, 2), (1,)), ((1,), (0, 3)), ((3,), (2,)))
    layout = PoolLayout(2, 4, 8, heads, (0.25, 0.5, 1.0))
    pool = RaggedPool(layout, [6, 6, 4], torch.float16, "cpu", 2, 6, page_size=2)
    other, row = pool.alloc_row(), pool.alloc_row()
    pool.reserve(other, [2, 2, 0])
    pool.reserve(row, [2, 4, 4])  # a 3-token prompt keeps 1 / 2 / 3, plus 1 decode token
    pool.append(row, [1, 2, 3])
    pool.append_decode([row])
    return pool


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


def draw_layer(draw, pool: RaggedPool, layer: int, x: int, y: int) -> int:
    """One layer's K storage as a strip of rows; returns the y below it."""
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
    row = 2
    owned = [
        set(pool.req_to_slot[g, row, : pool.reserved_counts(row)[g]].tolist())
        for g in range(pool.num_groups)
    ]
    for g in range(pool.num_groups):
        members = pool.heads_in(g, layer)
        n = len(members)
        count = pool.slots[g] + P
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        width = count * n * CELL_W
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
                fill = PADDING if s < P else tint(color, 0.55)
                draw.rectangle(
                    (x0, y, x0 + CELL_W - 1, y + CELL_H), fill=fill, outline=(255, 255, 255)
                )
                centered(draw, (x0, y, x0 + CELL_W, y + CELL_H), f"h{h}", small)
            if n and s in owned[g]:
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
        cx += width
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


def draw_requests(draw, pool: RaggedPool, row: int, x: int, y: int) -> int:
    small, label, bold = font(12), font(14), font(15, bold=True)
    draw.text(
        (x, y),
        f"request row {row}: req_to_slot[g, {row}, :max_context]  (its slots are outlined above)",
        font=bold,
        fill=(0, 0, 0),
    )
    y += 22
    draw.text(
        (x, y),
        "dark: written, attention reads req_to_slot[g, r, :group_lens[g, r]];  "
        "light: reserved, the next tokens go there;  white: unused columns",
        font=label,
        fill=(60, 60, 60),
    )
    y += 28
    for g in range(pool.num_groups):
        color = GROUP_COLORS[g % len(GROUP_COLORS)]
        lens, reserved = pool.written_counts(row)[g], pool.reserved_counts(row)[g]
        draw.text((x, y + 8), f"group {g}", font=label, fill=color)
        for c in range(pool.max_context):
            x0 = x + 80 + c * CELL_W
            if c < lens:
                fill, text = color, str(int(pool.req_to_slot[g, row, c]))
            elif c < reserved:
                fill, text = tint(color, 0.7), str(int(pool.req_to_slot[g, row, c]))
            else:
                fill, text = (248, 248, 248), ""
            draw.rectangle((x0, y, x0 + CELL_W - 2, y + CELL_H), fill=fill, outline=(150,) * 3)
            centered(draw, (x0, y, x0 + CELL_W, y + CELL_H), text, small)
        tx = x + 80 + pool.max_context * CELL_W + 16
        draw.text(
            (tx, y + 8),
            f"group_lens = {lens}, reserved = {reserved}",
            font=label,
            fill=(30, 30, 30),
        )
        y += CELL_H + 10
    return y + 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/pool_layout.png"))
    args = parser.parse_args()
    pool = example_pool()
    image = Image.new("RGB", (1320, 720), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (20, 14),
        "RaggedPool storage (page_size 2: slots 0-1 of every group are padding, grey)",
        font=font(18, bold=True),
        fill=(0, 0, 0),
    )
    y = 56
    for layer in range(pool.num_layers):
        y = draw_layer(draw, pool, layer, 20, y)
    y = draw_head_tables(draw, pool, 20, y)
    y = draw_requests(draw, pool, 2, 20, y)
    image = image.crop((0, 0, image.width, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
