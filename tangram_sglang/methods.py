"""The method names, in one place: what profiles, calibration, scorers and the CLI accept.

Pure names (no torch), so that the profile loader can check them without importing the
scorers; `tangram_sglang.compress.SCORERS` maps every scoring name to its class.
"""

# Token scorers serving can compress with (`--tangram-method`, a profile's `method`).
SCORING = (
    "snapkv",
    "ada-snapkv",
    "expected-attention",
    "headkv",
    "keydiff",
    "tova",
    "streaming",
    "duo",
)
# Methods whose per-head allocation calibration measures (`python -m tangram_sglang calibrate`).
CALIBRATED = ("snapkv", "ada-snapkv", "expected-attention", "duo", "headkv")
# What a profile may name: any scorer, or "uniform" (one ratio, built at start-up).
PROFILE = (*SCORING, "uniform")
