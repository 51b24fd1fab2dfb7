"""The ``atp`` command line: ``atp demo``, ``atp plugins``, ``atp models``."""

from __future__ import annotations

import argparse
import json
import sys


def _demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="prune a tiny random LLaVA offline and print what was kept")
    demo.add_argument("--layers", type=int, nargs="+", default=None, help="ATP layers (default 4 14 24)")
    demo.add_argument("--policy", default="atp", help="policy name (default atp)")
    demo.add_argument("--theta-r", type=float, default=0.5, help="initial redundancy threshold (atp policy)")
    demo.add_argument("--theta-s", type=float, default=0.9, help="initial spatial threshold (atp policy)")
    demo.add_argument("--image", default=None, help="an image file (default: a synthetic picture)")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print one JSON record instead of a table")


def build_parser() -> argparse.ArgumentParser:
    from atp.training.cli import add_parser as add_train_parser

    parser = argparse.ArgumentParser(
        prog="atp", description="Adaptive token pruning for vision-language models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    add_train_parser(sub)
    sub.add_parser("plugins", help="list every registered component and the package it comes from")
    models = sub.add_parser("models", help="list the supported model families")
    models.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from atp import demo

        try:
            return demo.main(args)
        except (ValueError, TypeError) as error:
            print(f"atp demo: error: {error}", file=sys.stderr)
            return 2
    if args.command == "train":
        from atp.training.cli import main as train_main

        return train_main(args)
    if args.command == "plugins":
        from atp.plugins import registry

        entries = registry().entries()
        width = max(len(e.name) for e in entries)
        for entry in entries:
            print(f"{entry.kind:<16} {entry.name:<{width}}  {entry.origin}")
        return 0
    if args.command == "models":
        from atp.attach import supported_models

        models = supported_models()
        if args.json:
            print(json.dumps(models, indent=2))
            return 0
        print(f"{'family':<16} {'model_type':<16} {'positions':<9} {'attention':<9} origin")
        for entry in models:
            types = ", ".join(entry["model_types"])
            print(
                f"{entry['family']:<16} {types:<16} {entry['positions']:<9} {', '.join(entry['attention']):<9} {entry['origin']}"
            )
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
