"""Attention over ragged head-group pools.

`aot_plan` (the Ahead-of-Time decode work tables, fixed per batch shape), `backend`
(SGLang's attention backend: compression inside each layer at extend, the ragged decode
kernels), `reference` (float64 attention over the same storage: the oracle of the kernels
and the backend), `flashinfer_path` (FlashInfer's paged decode over the same pools: the
comparison baseline).
"""
