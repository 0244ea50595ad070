"""`python -m tangram_sglang calibrate ...`: a profile calibrated on a model
(`tangram_sglang.offline.calibrate`, its own flags).
`python -m tangram_sglang plan ...`: capacity planning from a profile.
`python -m tangram_sglang synthetic ...`: a synthetic profile for a model that cannot be
calibrated (dummy weights on the GPU benchmarks), shaped like the model's config.json."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files

from tangram_sglang.memory.budget import Workload
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.capacity import capacity_plan, format_plan
from tangram_sglang.offline.profile import ModelIdentity, Profile, ProfileError

DEFAULT_PROFILE = "smollm2-135m-instruct.headkv.yaml"
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp32": 4}  # bytes per element


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tangram_sglang")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = _Defaults
    sub.add_parser(
        "calibrate",
        help="calibrate a profile on a model (python -m tangram_sglang calibrate --help)",
        add_help=False,
    )
    plan = sub.add_parser(
        "plan", help="sessions that fit: full KV vs uniform vs Tangram", formatter_class=fmt
    )
    plan.add_argument("--profile", help=f"profile YAML (default: shipped {DEFAULT_PROFILE})")
    plan.add_argument("--kv-gib", type=float, default=1.0, help="KV memory budget in GiB")
    plan.add_argument(
        "--kv-cache-dtype",
        default="bf16",
        choices=tuple(KV_BYTES),
        help="KV element type, as SGLang's flag names it (fp8: one byte per element)",
    )
    plan.add_argument("--page-size", type=int, default=1, help="tokens per KV page")
    plan.add_argument(
        "--tp-size", type=int, default=1, help="tensor-parallel ranks (--kv-gib is per GPU)"
    )
    plan.add_argument(
        "--ratio", type=float, help="memory share to serve at (default: the profile as calibrated)"
    )
    plan.add_argument("--context", type=int, default=8192, help="first prompt tokens per session")
    plan.add_argument("--turns", type=int, default=4, help="turns per session")
    plan.add_argument("--user-tokens", type=int, default=256, help="new user tokens per later turn")
    plan.add_argument("--answer-tokens", type=int, default=256, help="answer tokens per turn")
    synth = sub.add_parser(
        "synthetic", help="synthetic profile for a model's config.json", formatter_class=fmt
    )
    synth.add_argument("--model-path", required=True, help="folder with the model's config.json")
    synth.add_argument("--ratio", type=float, required=True, help="mean kept ratio, (0, 1]")
    synth.add_argument("--out", required=True, help="profile YAML to write")
    synth.add_argument("--groups", type=int, default=4, help="head groups (max)")
    synth.add_argument("--spread", type=float, default=0.6, help="log-normal sigma of ratios")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the ratios")
    return parser


def _synthetic(args: argparse.Namespace) -> int:
    model = ModelIdentity.from_model_path(args.model_path)
    profile = synthetic_profile(model, args.ratio, args.spread, args.seed, args.groups)
    profile.save(args.out)
    ratios = [round(r, 4) for r in profile.group_ratios()]
    print(
        f"{args.out}: {model.architecture} {model.num_layers}x{model.num_kv_heads} kv heads, "
        f"{profile.num_groups} groups at ratios {ratios}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:  # its own parser: torch and the scorers load only here
        from tangram_sglang.offline.calibrate import main as calibrate

        return calibrate(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "synthetic":
        try:
            return _synthetic(args)
        except (ProfileError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.profile:
            profile = Profile.load(args.profile)
        else:
            profile = Profile.load(files("tangram_sglang.profiles") / DEFAULT_PROFILE)
        if args.turns < 1 or min(args.context, args.user_tokens, args.answer_tokens) < 0:
            raise ValueError("--turns must be >= 1 and token counts >= 0")
        workload = Workload(args.context, args.turns, args.user_tokens, args.answer_tokens)
        kv_bytes = int(args.kv_gib * 2**30)
        dtype_bytes = KV_BYTES[args.kv_cache_dtype]
        plan = capacity_plan(
            profile, kv_bytes, workload, dtype_bytes, args.page_size, args.ratio, args.tp_size
        )
    except (ProfileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(plan, profile, kv_bytes, workload, dtype_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
