"""Offline, before serving: what each head keeps and how heads group.

Read in order: `profile` (the per-head profile file and its head groups), `calibrate`
(measuring per-head budgets on a model, `python -m tangram_sglang calibrate`), `grouping`
(heads into groups of equal ratio), `capacity` (sessions that fit a KV budget,
`python -m tangram_sglang plan`).
"""
