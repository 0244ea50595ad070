"""Models the tests, the demo and the benchmarks run: the real reference model
(SmolLM2) and tiny random ones."""
