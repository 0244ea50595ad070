"""Fast Fusion ("Joint Encoding of KV-Cache Blocks for Scalable LLM Serving"), offline.

Nearly identical KV blocks of different requests (batch fusion) or of different prefill
chunks of one input (chunk fusion) are stored once: a shared direction per fused set plus
each member's own norm. This package is the math and its measurement, not yet a serving
mode (docs/architecture.md, "Fast Fusion", says what the pools will need). Reading order:

- `blocks.py`: what a block is (page of tokens x the heads of one unit: a head group of a
  layer, a whole layer, one head, or a group's slot across layers), cut and pasted back;
- `encoding.py`: `FusedBlocks` (shared vectors, member index, member scale), encode/decode;
- `merge.py`: the tree-structured merge over units of fusion (requests or chunks), with
  the per-member distortion guard; `batch_fusion` and `chunk_fusion`;
- `thresholds.py`: per-layer thresholds, the paper's middle-layer default;
- `report.py`: the rate-distortion report per layer (compression, cosine distortion,
  attention-output error with real queries, the Poisson prediction of matches).
"""
