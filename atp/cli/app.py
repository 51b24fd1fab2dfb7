"""The ``atp`` command line: the parser built from the command modules, :func:`main` and the dispatch.

One module per command, each with ``add_parser(sub)`` (its subcommand and flags) and ``main(args)``
(runs it, returns the exit status):

- :mod:`atp.cli.demo`: ``atp demo``, prune one image's visual tokens and print what was kept
- :mod:`atp.cli.visualize`: ``atp visualize``, pictures of what was pruned (the paper's Fig. 4)
- :mod:`atp.cli.train`: ``atp train``, the paper's training recipe with transformers' Trainer
- :mod:`atp.cli.eval`: ``atp eval``, lmms-eval per method and the Table 1 layout (:mod:`atp.evaluation.table`)
- :mod:`atp.cli.flops`: ``atp flops``, analytic FLOPs, KV cache and Token metric of a schedule
- :mod:`atp.cli.bench`: ``atp bench``, latency and memory, unpruned vs atp vs fastv vs fixed
- :mod:`atp.cli.plugins`: ``atp plugins``, the registered components and their packages
- :mod:`atp.cli.models`: ``atp models``, the supported model families
- :mod:`atp.cli.doctor`: ``atp doctor``, versions, plugins and a self-check (for bug reports)
- :mod:`atp.cli.tiny_checkpoint`: ``atp tiny-checkpoint``, a tiny random model written to a folder

Shared by the commands: :mod:`atp.cli.loading` (``--model`` and the ATP flags), :mod:`atp.cli.options`
(``--option KEY=VALUE``; :func:`parse_options` and :func:`add_option_argument` are re-exported here),
:mod:`atp.cli.plotting` (every figure). The scaling run, ``python -m atp.cli.scaling``, is a
developer tool of its own (:mod:`atp.cli.scaling`), not a subcommand.

Bad input ends with ``atp <command>: error: <what to do>`` and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import sys

from atp.cli import (
    bench,
    demo,
    doctor,
    flops,
    models,
    plugins,
    tiny_checkpoint,
    train,
    visualize,
)
from atp.cli import eval as eval_command
from atp.cli.options import add_option_argument, parse_options

__all__ = ["COMMANDS", "add_option_argument", "build_parser", "main", "parse_options"]

COMMANDS = {  # the subcommands in the order `atp --help` lists them, each its module
    "demo": demo,
    "visualize": visualize,
    "train": train,
    "eval": eval_command,
    "flops": flops,
    "bench": bench,
    "plugins": plugins,
    "models": models,
    "doctor": doctor,
    "tiny-checkpoint": tiny_checkpoint,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atp", description="Adaptive token pruning for vision-language models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def library_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout of its import, and announces its accelerator as it
    is imported; transformers >= 5.25 imports it (when installed) on its own import. Imported here
    with stdout pointed at stderr, it never mixes into a command's output (a dry run's JSON, the
    commands of ``atp eval --dry-run``)."""
    import contextlib
    import importlib.util

    if "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is not None:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed.utils.logging  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    library_logs_to_stderr()
    try:
        return COMMANDS[args.command].main(args)
    except (ValueError, TypeError, OSError) as error:  # bad input: a message, not a traceback
        print(f"atp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
