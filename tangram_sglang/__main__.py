"""`python -m tangram_sglang plan ...`: capacity planning from a profile."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files

from tangram_sglang.budget import Workload
from tangram_sglang.planner import capacity_plan, format_plan
from tangram_sglang.profile import Profile, ProfileError

DEFAULT_PROFILE = "tiny-qwen3.ada-snapkv.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangram_sglang")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="sessions that fit: full KV vs uniform vs Tangram")
    plan.add_argument("--profile", help=f"profile YAML (default: shipped {DEFAULT_PROFILE})")
    plan.add_argument("--kv-gib", type=float, default=1.0, help="KV memory budget in GiB")
    plan.add_argument("--dtype-bytes", type=int, default=2, choices=(1, 2, 4))
    plan.add_argument("--page-size", type=int, default=1)
    plan.add_argument("--ratio", type=float, help="serve at this kept ratio (default: calibrated)")
    plan.add_argument("--context", type=int, default=8192)
    plan.add_argument("--turns", type=int, default=4)
    plan.add_argument("--user-tokens", type=int, default=256)
    plan.add_argument("--answer-tokens", type=int, default=256)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.profile:
            profile = Profile.load(args.profile)
        else:
            profile = Profile.load(files("tangram_sglang.profiles") / DEFAULT_PROFILE)
        if args.turns < 1 or min(args.context, args.user_tokens, args.answer_tokens) < 0:
            raise ValueError("--turns must be >= 1 and token counts >= 0")
        workload = Workload(args.context, args.turns, args.user_tokens, args.answer_tokens)
        kv_bytes = int(args.kv_gib * 2**30)
        plan = capacity_plan(
            profile, kv_bytes, workload, args.dtype_bytes, args.page_size, args.ratio
        )
    except (ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, profile, kv_bytes, workload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
