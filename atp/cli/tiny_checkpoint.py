"""``atp tiny-checkpoint DIR``: write a tiny random model with a real processor to a folder,
loadable with the Auto classes and ``--model DIR`` (:mod:`atp.tiny.checkpoint`), offline.
:func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    from atp.arguments import COUNT, SEED, at_least
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
    tiny.add_argument(
        "--head-dim",
        type=at_least(2),
        default=16,
        metavar="D",
        help="width of the language model's 4 attention heads (default 16; vLLM's CPU attention takes 32 "
        "to 512, docs/serving.md)",
    )
    tiny.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")


def main(args) -> int:
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
    if args.head_dim % 2:
        raise ValueError(f"--head-dim must be even (rotary positions rotate pairs), got {args.head_dim}")
    write_tiny_checkpoint(folder, args.family, args.num_layers, args.seed, args.head_dim)
    files = ", ".join(sorted(path.name for path in folder.iterdir()))
    shape = f"{args.num_layers} layers, seed {args.seed}" + (
        f", head_dim {args.head_dim}" if args.head_dim != 16 else ""
    )
    print(f"wrote a tiny random {args.family} ({shape}) to {folder}: {files}")
    print(f"load it with AutoProcessor / AutoModelForImageTextToText.from_pretrained({str(folder)!r})")
    return 0
