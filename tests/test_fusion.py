"""Fast Fusion offline (`tangram_sglang/fusion`): the distortion bound, exactness at 1.0,
the tree merge against brute force, and the encode/decode round trips."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tangram_sglang.fusion.blocks import from_blocks, to_blocks, units
from tangram_sglang.fusion.encoding import cosine, decode, encode
from tangram_sglang.fusion.merge import GUARD_MARGIN, batch_fusion, chunk_fusion, tree_merge
from tangram_sglang.fusion.report import Capture, fuse_captures, poisson_matched
from tangram_sglang.fusion.thresholds import LayerThresholds
from tangram_sglang.offline.profile import Profile

PROFILE = Path(__file__).resolve().parents[1] / "profiles/smollm2-135m-instruct.ada-snapkv.yaml"


def planted(owners: int, per_owner: int, dim: int, clusters: int, noise: float, seed: int):
    """Random blocks, plus `clusters` near-duplicate families with one member in each of
    some owners (the rest random): `(x [N, dim], owner [N], family [N] or -1)`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(owners * per_owner, dim, generator=g)
    owner = torch.arange(owners).repeat_interleave(per_owner)
    family = torch.full((owners * per_owner,), -1)
    centers = torch.randn(clusters, dim, generator=g)
    for c in range(clusters):
        for o in torch.randperm(owners, generator=g)[: max(2, owners // 2)].tolist():
            i = o * per_owner + c  # slot c of owner o
            scale = 0.5 + torch.rand((), generator=g)
            x[i] = scale * (centers[c] + noise * torch.randn(dim, generator=g))
            family[i] = c
    return x, owner, family


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.99])
def test_every_fused_member_stays_within_the_threshold_of_its_decoded_block(threshold):
    k, owner, _ = planted(owners=6, per_owner=10, dim=96, clusters=6, noise=0.05, seed=1)
    v, _, _ = planted(owners=6, per_owner=10, dim=96, clusters=6, noise=0.05, seed=2)
    result = batch_fusion([k, v], owner, [threshold, threshold])
    for name, x in (("K", k), ("V", v)):
        fused = encode(x, result.labels)
        cos = cosine(x, decode(fused))
        assert float(cos.min()) >= threshold, (
            f"{name}: a decoded block has cosine {float(cos.min()):.6f} < {threshold}"
        )
        assert fused.blocks_stored < fused.blocks_in, f"nothing fused at {threshold}"
    # Decoded blocks keep their own norm: fusion errs only in angle.
    decoded = decode(encode(k, result.labels))
    assert torch.allclose(decoded.norm(dim=1), k.norm(dim=1), rtol=1e-5)


def test_the_guard_refuses_a_merge_whose_mean_drifts_past_the_threshold():
    """Set {0, 0.78 rad} and set {1.17, 1.17} (2-D directions): their directions are 0.78
    apart (cosine 0.71 >= 0.7), so the paper merges them, but the merged mean sits 0.796
    rad from the block at 0 (cosine 0.699 < 0.7). The guard keeps the two sets apart."""
    angles = (0.0, 0.78, 1.17, 1.17)
    x = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    unit = F.normalize(x, dim=1)
    mean = F.normalize(unit.sum(0), dim=0)
    assert float(unit[0] @ mean) < 0.7  # what the unguarded merge would decode block 0 to
    labels = tree_merge([x], torch.arange(4), [0.7]).labels
    assert labels.tolist() == [0, 0, 2, 2]
    assert float(cosine(x, decode(encode(x, labels))).min()) >= 0.7


def test_threshold_one_fuses_only_bit_identical_blocks_and_decodes_exactly():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 64, generator=g)
    near = base.clone()
    near[:, 0] = torch.nextafter(near[:, 0], torch.full_like(near[:, 0], math.inf))
    scaled = base * (1 + 2**-20)  # same direction, other bits: cosine rounds to 1.0
    x = torch.cat([base, base, near, scaled])
    owner = torch.arange(4).repeat_interleave(8)
    labels = tree_merge([x], owner, [1.0]).labels
    for i in range(8):
        assert labels[8 + i] == labels[i], "identical blocks of two owners must fuse"
        assert labels[16 + i] != labels[i] and labels[24 + i] != labels[i], (
            "a block differing in any bit fused at threshold 1.0"
        )
    fused = encode(x, labels)
    assert fused.blocks_stored == 24
    assert torch.equal(decode(fused), x), "decode at threshold 1.0 is not bit-exact"


def test_attention_over_blocks_fused_at_threshold_one_equals_the_original():
    g = torch.Generator().manual_seed(4)
    layers, hkv, hq, t, d, page = 4, 2, 4, 40, 16, 8

    def capture(k, v):
        q = [torch.randn(hq, 5, d, generator=g) for _ in range(layers)]
        return Capture(k, v, q, torch.arange(t - 5, t))

    k = [torch.randn(hkv, t, d, generator=g) for _ in range(layers)]
    v = [torch.randn(hkv, t, d, generator=g) for _ in range(layers)]
    other_k = [x.clone() for x in k]
    other_k[2][:, 16:24] += 1e-3  # one page differs in one fused layer
    captures = [capture(k, v), capture([x.clone() for x in k], v), capture(other_k, v)]
    thresholds = LayerThresholds.middle(layers, 1.0, first=1, last=1)
    unit_list = units("layer", thresholds.fused_layers, hkv)
    reports, totals = fuse_captures(captures, unit_list, thresholds, page)
    for r in reports:
        assert r.attention_error == 0.0, f"layer {r.layer}: attention changed at 1.0"
        assert max(r.k_distortion or [0.0]) == 0.0 and max(r.v_distortion or [0.0]) == 0.0
    fused_rows = [r.row() for r in reports if r.threshold is not None]
    # 3 requests x 5 pages: all three share every page, but for the page the third request
    # changed in layer 2, which it stores apart.
    assert [r["blocks_stored"] for r in fused_rows] == [5, 6], fused_rows
    assert totals["saved_elements"] > 0


def _reference_tree(x: list[torch.Tensor], owner: list[int], thr: list[float]) -> list[int]:
    """The merge spec written out pair by pair (no batched products): bottom-up pairing,
    each right set tries its best allowed left set, most similar first, guarded."""
    n = len(owner)
    unit = [[F.normalize(f[i], dim=0) for i in range(n)] for f in x]
    members = {i: [i] for i in range(n)}
    sums = {i: [unit[j][i].clone() for j in range(len(x))] for i in range(n)}

    def direction(s, j):
        return F.normalize(sums[s][j], dim=0)

    nodes = [[i for i in range(n) if owner[i] == o] for o in sorted(set(owner))]
    while len(nodes) > 1:
        nxt = []
        for a in range(0, len(nodes) - 1, 2):
            left, right = nodes[a], nodes[a + 1]
            best = []
            for r in right:
                top, arg = -2.0, None
                for li, s in enumerate(left):
                    cos = [float(direction(r, j) @ direction(s, j)) for j in range(len(x))]
                    if all(c >= t for c, t in zip(cos, thr, strict=True)):
                        score = sum(cos) / len(cos)
                        if score > top:
                            top, arg = score, li
                best.append((top, arg))
            merged = set()
            for r in sorted(range(len(right)), key=lambda r: (-best[r][0], r)):
                if best[r][1] is None:
                    continue
                s, rr = left[best[r][1]], right[r]
                group = members[s] + members[rr]
                ok = all(
                    min(
                        float(unit[j][m] @ F.normalize(sums[s][j] + sums[rr][j], dim=0))
                        for m in group
                    )
                    >= thr[j] + GUARD_MARGIN
                    for j in range(len(x))
                )
                if ok:
                    members[s] = group
                    members[rr] = []
                    sums[s] = [a + b for a, b in zip(sums[s], sums[rr], strict=True)]
                    merged.add(r)
            nxt.append(left + [s for r, s in enumerate(right) if r not in merged])
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes = nxt
    labels = list(range(n))
    for group in members.values():
        for m in group:
            labels[m] = min(group)
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_tree_merge_equals_the_pairwise_reference_on_small_inputs(seed):
    k, owner, _ = planted(owners=5, per_owner=4, dim=8, clusters=3, noise=0.3, seed=seed)
    v, _, _ = planted(owners=5, per_owner=4, dim=8, clusters=3, noise=0.3, seed=seed + 50)
    thr = [0.6, 0.5]
    got = tree_merge([k, v], owner, thr).labels.tolist()
    assert got == _reference_tree([k, v], owner.tolist(), thr)
    assert len(set(got)) < len(got), "no fusion: the comparison would be vacuous"


@pytest.mark.parametrize("owners", [2, 3, 5, 8])
def test_tree_merge_equals_brute_force_components_on_separated_clusters(owners):
    """Families far apart (cosine ~0 between them, >= 0.98 within): the tree over owners
    finds exactly the connected components of the all-pairs cross-owner search."""
    x, owner, family = planted(owners, per_owner=6, dim=128, clusters=4, noise=0.05, seed=7)
    thr = 0.9
    result = tree_merge([x], owner, [thr])
    parent = list(range(len(owner)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    unit = F.normalize(x, dim=1)
    for i in range(len(owner)):
        for j in range(i + 1, len(owner)):
            if owner[i] != owner[j] and float(unit[i] @ unit[j]) >= thr:
                parent[root(j)] = root(i)
    brute = {}
    for i in range(len(owner)):
        brute.setdefault(root(i), []).append(i)
    tree = {}
    for i, label in enumerate(result.labels.tolist()):
        tree.setdefault(label, []).append(i)
    assert sorted(brute.values()) == sorted(tree.values())
    for c in range(4):
        members = (family == c).nonzero().flatten().tolist()
        assert len(set(result.labels[members].tolist())) == 1, f"family {c} not fused"
    assert result.levels == math.ceil(math.log2(owners))


def test_blocks_meet_only_through_another_unit():
    """A unit's own blocks are never compared with each other: one chunk alone fuses
    nothing; a block repeated in every chunk is stored once."""
    same = torch.randn(1, 32).repeat(12, 1)  # twelve identical blocks
    alone = chunk_fusion([same], blocks_per_chunk=12, thresholds=[1.0])
    assert alone.labels.tolist() == list(range(12)) and alone.comparisons == 0
    x = torch.randn(4, 32).repeat(3, 1)  # the same 4 blocks in each of 3 chunks
    three = chunk_fusion([x], blocks_per_chunk=4, thresholds=[1.0])
    assert three.labels.tolist() == [0, 1, 2, 3] * 3
    assert three.levels == 2


def test_decode_writes_every_element_of_a_poisoned_buffer():
    x, owner, _ = planted(owners=4, per_owner=6, dim=32, clusters=3, noise=0.05, seed=9)
    fused = encode(x, batch_fusion([x], owner, [0.9]).labels)
    assert fused.blocks_stored < fused.blocks_in
    out = torch.full_like(x, float("nan"))
    decode(fused, out=out)
    assert torch.equal(out, decode(fused))


def test_blocks_round_trip_into_a_poisoned_cache_and_leave_the_tail_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, 8, generator=g)
    heads, page = (0, 2), 8
    blocks = to_blocks(x, heads, page)
    assert blocks.shape == (4, page * 2 * 8)
    out = torch.full_like(x, float("nan"))
    from_blocks(blocks, out, heads, page)
    assert torch.equal(out[list(heads), :32], x[list(heads), :32])
    assert out[:, 32:].isnan().all() and out[1].isnan().all()
    singles = encode(blocks, torch.arange(4))
    assert torch.equal(singles.shared, blocks) and torch.equal(decode(singles), blocks)


def test_middle_layer_default_and_bad_thresholds():
    t = LayerThresholds.middle(30, 0.8)
    assert t.fused_layers == tuple(range(2, 28))
    assert t[0] is None and t[29] is None and t[2] == 0.8
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="outside"):
            LayerThresholds.middle(30, bad)


def test_units_of_the_shipped_profile_cover_every_head_once():
    profile = Profile.load(PROFILE)
    m = profile.model
    layers = range(m.num_layers)
    for kind in ("layer", "group", "head", "slot"):
        seen = sorted(
            (layer, h) for u in units(kind, layers, m.num_kv_heads, profile) for layer, hs in
            u.pieces for h in hs
        )  # fmt: skip
        assert seen == [(layer, h) for layer in layers for h in range(m.num_kv_heads)], kind
    assert len(units("slot", layers, m.num_kv_heads, profile)) == profile.num_groups


def test_poisson_prediction_counts_partners_across_owners_only():
    x = torch.randn(1, 16).repeat(6, 1)
    same_owner = poisson_matched([x], torch.zeros(6, dtype=torch.int64), [0.9])
    assert same_owner == 0.0
    two = poisson_matched([x], torch.tensor([0, 0, 0, 1, 1, 1]), [0.9])
    assert two == pytest.approx(6 * (1 - math.exp(-3)))
