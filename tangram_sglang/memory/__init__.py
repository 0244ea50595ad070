"""KV memory: one request's budget from admission to free, read in this order.

`budget` (pure math: tokens a segment keeps per group), `layout` (groups, ratios and bytes
per slot), `ragged_kv` (the ragged head-group storage views), `pool` (storage and per-group
slot allocators), `reservation` (the Budget Reservation ledger: need, room, reserve, bind,
consume, settle, release), `allocator` (SGLang's allocator interface: logical slots mapped
to group slots, extend and decode), `radix` (SGLang's radix tree over logical slots, with
per-group evictable counts); `staging` (a step's host tables to the device without a
wait).
"""
