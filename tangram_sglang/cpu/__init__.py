"""Running the real SGLang server on a machine without CUDA (the README's main job, CI,
the accuracy and serving benchmarks): its launcher and the stand-ins it needs."""
