"""``atp models``: the supported model families, their model types, positions and attention
(:func:`atp.host.attach.supported_models`), as a table or ``--json``. :func:`add_parser` adds the
command, :func:`main` runs it.
"""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list the supported model families")
    models.add_argument("--json", action="store_true")


def main(args) -> int:
    from atp.host.attach import supported_models

    models = supported_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'family':<16} {'model_type':<16} {'positions':<9} {'attention':<9} origin")
    for entry in models:
        types = ", ".join(entry["model_types"])
        attention = ", ".join(entry["attention"])
        print(f"{entry['family']:<16} {types:<16} {entry['positions']:<9} {attention:<9} {entry['origin']}")
    return 0
