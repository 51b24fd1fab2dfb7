"""The ``atp`` command line: demo, visualize, train, eval, flops, bench, plugins, models, doctor,
tiny-checkpoint.

Bad input ends with ``atp <command>: error: <what to do>`` and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys


def _demo_parser(sub) -> None:
    from atp.arguments import COUNT, OPEN_FRACTION, SEED
    from atp.cli.loading import add_atp_arguments, add_model_arguments

    demo = sub.add_parser("demo", help="prune a model's visual tokens on one image and print what was kept")
    add_model_arguments(demo, "a tiny random LLaVA-1.5-shaped model, offline")
    add_atp_arguments(demo)
    demo.add_argument(
        "--theta-r", type=OPEN_FRACTION, default=0.5, help="initial redundancy threshold (atp policy)"
    )
    demo.add_argument(
        "--theta-s", type=OPEN_FRACTION, default=0.9, help="initial spatial threshold (atp policy)"
    )
    demo.add_argument("--image", default=None, help="an image file (default: a synthetic picture)")
    demo.add_argument("--prompt", default="Describe the image.", help="the question (with --model)")
    demo.add_argument("--max-new-tokens", type=COUNT, default=8)
    demo.add_argument("--seed", type=SEED, default=0, help="the embedded model's weights")
    demo.add_argument("--json", action="store_true", help="print one JSON record instead of a table")


def add_option_argument(parser) -> None:
    """``--option KEY=VALUE`` (repeatable), read by :func:`parse_options`."""
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option; VALUE is JSON (e.g. --policy fixed --option keep=[144,72,36], "
        "--option ratio=0.5, --option use_spatial=false), or plain text for an option whose default "
        "is a string (--option threshold_head=binned); repeatable",
    )


def parse_options(pairs: list[str], policy: str | None = None) -> dict:
    """``--option KEY=VALUE`` pairs -> policy options: ``["keep=[144,72]"]`` -> {"keep": [144, 72]}.

    The one rule, for every command: VALUE is read as JSON. An option of ``policy`` whose default
    is a string (threshold_head, scorer, ...) also takes plain text (``threshold_head=binned``);
    for any other option, VALUE that is not JSON is an error with an example, never a guess.
    Names the policy does not take are left to ``atp.attach``, which lists the ones it does.
    """
    known, text = set(), set()
    if policy is not None:
        from atp.plugins import registry

        parameters = inspect.signature(registry().get("policy", policy).factory.__init__).parameters
        known = set(parameters) - {"self", "context"}
        text = {name for name in known if isinstance(parameters[name].default, str)}
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option needs KEY=VALUE, got {pair!r}; e.g. --option keep=[144,72,36]")
        if key in options:
            raise ValueError(f"--option {key} is given twice; give each option once")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError as error:
            if key in text or (policy is not None and key not in known):
                options[key] = value
                continue
            raise ValueError(
                f"--option {pair}: {value!r} is not valid JSON ({error.msg}); VALUE is JSON, e.g. "
                "--option keep=[144,72,36], --option ratio=0.5 or --option use_spatial=false "
                "(quote the whole pair for the shell when it has spaces or brackets)"
            ) from None
    return options


def _flops_parser(sub) -> None:
    from atp.arguments import COUNT, LAYER, NON_NEGATIVE, POSITIVE

    flops = sub.add_parser("flops", help="analytic FLOPs, KV cache and Token metric of a pruning schedule")
    source = flops.add_mutually_exclusive_group(required=True)
    from atp.core.efficiency import PRESETS

    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--config", help="a local folder or config.json of a transformers model (no weights)")
    flops.add_argument("--layers", type=LAYER, nargs="+", required=True, help="ATP layers, e.g. 4 14 24")
    flops.add_argument(
        "--kept",
        type=NON_NEGATIVE,
        nargs="+",
        required=True,
        help="visual tokens kept after each ATP layer, never more than after the layer before; a value in "
        "(0, 1) is a fraction of those alive before it",
    )
    flops.add_argument("--visual-tokens", type=POSITIVE, default=None, help="visual tokens before pruning")
    flops.add_argument(
        "--text-tokens", type=NON_NEGATIVE, default=0, help="text tokens (default 0: visual only, as Table 6)"
    )
    flops.add_argument("--convention", choices=["paper", "2flops-per-mac"], default="paper")
    flops.add_argument("--include-vision", action="store_true", help="add the image encoder")
    flops.add_argument("--include-lm-head", action="store_true", help="add the LM head over the prompt")
    flops.add_argument("--kv-bytes", type=COUNT, default=2, help="bytes per cached element (2: bf16)")
    flops.add_argument("--json", action="store_true")


def _flops_main(args) -> int:
    from atp.core import efficiency

    if args.preset:
        shape = efficiency.PRESETS[args.preset]
    else:
        from transformers import AutoConfig

        shape = efficiency.shape_from_config(AutoConfig.from_pretrained(args.config), name=args.config)
        if shape.visual_tokens == 0 and args.visual_tokens is None:
            raise ValueError("this model's visual token count depends on the input; give --visual-tokens")
    if args.kv_bytes < 1:
        raise ValueError(f"--kv-bytes must be >= 1, got {args.kv_bytes}")
    if not 0 <= args.text_tokens < math.inf:
        raise ValueError(f"--text-tokens must be a finite count >= 0, got {args.text_tokens:g}")
    if args.visual_tokens is not None and not 0 < args.visual_tokens < math.inf:
        raise ValueError(f"--visual-tokens must be a finite count > 0, got {args.visual_tokens:g}")
    result = efficiency.report(
        shape,
        args.layers,
        args.kept,
        args.visual_tokens,
        args.text_tokens,
        args.convention,
        args.include_vision,
        args.include_lm_head,
        args.kv_bytes,
        fractions=True,  # a value in (0, 1) is a fraction of the tokens alive, as the fixed policy reads it
    )
    print(result.to_json() if args.json else result.table())
    return 0


def _bench_parser(sub) -> None:
    from atp.arguments import at_least
    from atp.cli.loading import add_atp_arguments, add_model_arguments

    bench = sub.add_parser(
        "bench", help="prefill / decode latency and memory: unpruned vs atp vs fastv vs fixed"
    )
    add_model_arguments(bench, "a random LLaVA-1.5-shaped model sized by --num-layers / --hidden-size")
    add_atp_arguments(bench)
    bench.add_argument("--small", action="store_true", help="on a GPU, use the CPU-sized model")
    bench.add_argument(
        "--num-layers", type=at_least(2), default=None, help="decoder layers (CPU default 8, GPU 32)"
    )
    bench.add_argument(
        "--hidden-size", type=at_least(16), default=None, help="LM width (CPU default 1024, GPU 4096)"
    )
    bench.add_argument(
        "--repeats",
        type=at_least(1),
        default=None,
        help="timed rounds, median and bootstrap interval reported (default 10)",
    )
    bench.add_argument(
        "--warmup", type=at_least(0), default=None, help="untimed rounds first (CPU default 1, GPU 3)"
    )
    bench.add_argument(
        "--threads",
        type=at_least(1),
        default=None,
        help="torch threads on CPU (default: the cores this process may use)",
    )
    bench.add_argument(
        "--profile", action="store_true", help="add torch.profiler op tables of one prefill, unpruned vs atp"
    )
    bench.add_argument("--new-tokens", type=at_least(1), default=None, help="decode steps timed (default 8)")
    bench.add_argument(
        "--text-tokens", type=at_least(9), default=None, help="prompt text tokens (default 48)"
    )
    bench.add_argument("--output", default=None, help="also write the JSON record to this file")
    bench.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    bench.add_argument("--json", action="store_true", help="print the JSON record instead of the table")


def _tiny_checkpoint_parser(sub) -> None:
    from atp.arguments import COUNT, SEED
    from atp.tiny.checkpoint import FAMILIES

    tiny = sub.add_parser(
        "tiny-checkpoint",
        help="write a tiny random model with a real processor to a folder, loadable with the Auto classes",
    )
    tiny.add_argument("dir", metavar="DIR", help="the folder to write (created if missing)")
    tiny.add_argument("--family", choices=FAMILIES, default="llava", help="model family (default llava)")
    tiny.add_argument(
        "--num-layers",
        "--layers",
        type=COUNT,
        default=4,
        help="decoder layers of the language model (default 4)",
    )
    tiny.add_argument(
        "--seed", type=SEED, default=0, metavar="S", help="seed of the random weights (default 0)"
    )
    tiny.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")


def build_parser() -> argparse.ArgumentParser:
    from atp.cli.train import add_parser as add_train_parser
    from atp.cli.visualize import add_parser as add_visualize_parser
    from atp.evaluation.table import add_parser as add_eval_parser

    parser = argparse.ArgumentParser(
        prog="atp", description="Adaptive token pruning for vision-language models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    add_visualize_parser(sub)
    add_train_parser(sub)
    add_eval_parser(sub)
    _flops_parser(sub)
    _bench_parser(sub)
    sub.add_parser("plugins", help="list every registered component and the package it comes from")
    models = sub.add_parser("models", help="list the supported model families")
    models.add_argument("--json", action="store_true")
    doctor = sub.add_parser(
        "doctor", help="versions, tested range, plugins and a self-check on a tiny model (for bug reports)"
    )
    doctor.add_argument("--json", action="store_true")
    _tiny_checkpoint_parser(sub)
    return parser


def _demo_main(args) -> int:
    from atp.cli import demo

    return demo.main(args)


def _bench_main(args) -> int:
    from atp.cli import bench

    return bench.main(args)


def _train_main(args) -> int:
    from atp.cli.train import main as train_main

    return train_main(args)


def _visualize_main(args) -> int:
    from atp.cli.visualize import main as visualize_main

    return visualize_main(args)


def _eval_main(args) -> int:
    from atp.evaluation.table import main as eval_main

    return eval_main(args)


def _plugins_main(args) -> int:
    from atp.plugins import registry

    entries = registry().entries()
    width = max(len(e.name) for e in entries)
    for entry in entries:
        print(f"{entry.kind:<16} {entry.name:<{width}}  {entry.origin}")
    return 0


def _models_main(args) -> int:
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


def _doctor_main(args) -> int:
    from atp.cli import doctor

    return doctor.main(args)


def _tiny_checkpoint_main(args) -> int:
    from pathlib import Path

    from atp.tiny.checkpoint import write_tiny_checkpoint

    folder = Path(args.dir)
    if args.num_layers < 1:
        raise ValueError(f"--num-layers must be >= 1, got {args.num_layers}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; give a folder to write the checkpoint to")
    if folder.is_dir() and any(folder.iterdir()) and not args.force:
        raise ValueError(f"{folder} is not empty; give an empty or new folder, or --force to write into it")
    write_tiny_checkpoint(folder, args.family, args.num_layers, args.seed)
    files = ", ".join(sorted(path.name for path in folder.iterdir()))
    print(
        f"wrote a tiny random {args.family} ({args.num_layers} layers, seed {args.seed}) to {folder}: {files}"
    )
    print(f"load it with AutoProcessor / AutoModelForImageTextToText.from_pretrained({str(folder)!r})")
    return 0


COMMANDS = {
    "demo": _demo_main,
    "visualize": _visualize_main,
    "train": _train_main,
    "eval": _eval_main,
    "flops": _flops_main,
    "bench": _bench_main,
    "plugins": _plugins_main,
    "models": _models_main,
    "doctor": _doctor_main,
    "tiny-checkpoint": _tiny_checkpoint_main,
}


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
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as error:  # bad input: a message, not a traceback
        print(f"atp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
