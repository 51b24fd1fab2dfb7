"""``atp plugins``: every registered component (policies, scorers, backbones, ...) and the package
it comes from (:func:`atp.plugins.registry`). :func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    sub.add_parser("plugins", help="list every registered component and the package it comes from")


def main(args) -> int:
    from atp.plugins import registry

    entries = registry().entries()
    width = max(len(e.name) for e in entries)
    for entry in entries:
        print(f"{entry.kind:<16} {entry.name:<{width}}  {entry.origin}")
    return 0
