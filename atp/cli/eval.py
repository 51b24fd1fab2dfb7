"""``atp eval``: lmms-eval once per method at one Token metric, and the paper's Table 1 layout.

The command's parser and its run are the evaluation's own (:mod:`atp.evaluation.table`, next to
the lmms-eval model of :mod:`atp.evaluation.lmms`); this module is the command line's entry to
them: :func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from atp.evaluation.table import add_parser as add_eval_parser

    add_eval_parser(sub)


def main(args) -> int:
    from atp.evaluation.table import main as eval_main

    return eval_main(args)
