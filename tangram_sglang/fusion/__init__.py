"""Fast Fusion ("Joint Encoding of KV-Cache Blocks for Scalable LLM Serving").

Nearly identical KV blocks of different requests (batch fusion) or of different prefill
chunks of one input (chunk fusion) are stored once: a shared direction per fused set plus
each member's own norm. The offline modules are the math and its measurement; `serving`
is what the server runs (`--kv-compression fastfusion`, `--tangram-fusion TAU`): a batch's
new blocks read an earlier request's block at the same position as stored (of the batch,
or still held from an earlier batch), within a guard, and give their own slots back to
the pools (`TangramAllocator.share`). Reading order:

- `blocks.py`: what a block is (page of tokens x the heads of one unit: a head group of a
  layer, a whole layer, one head, or a group's slot across layers), cut and pasted back;
- `encoding.py`: `FusedBlocks` (shared vectors, member index, member scale), encode/decode;
- `merge.py`: the tree-structured merge over units of fusion (requests or chunks), with
  the per-member distortion guard; `batch_fusion` and `chunk_fusion`;
- `thresholds.py`: per-layer thresholds, the paper's middle-layer default;
- `report.py`: the rate-distortion report per layer (compression, cosine distortion,
  attention-output error with real queries, the Poisson prediction of matches);
- `serving.py`: `BatchFusion`, the guarded member -> representative pairs of one extend
  batch, per head group (the unit a pool can free), against the batch's earlier requests
  and the `LiveBlocks` earlier batches left in the pool.
"""
