"""``atp tiny-checkpoint DIR``: write a tiny random model with a real processor to a folder,
loadable with the Auto classes and ``--model DIR`` (:mod:`atp.tiny.checkpoint`), offline.
:func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations


def add_parser(sub) -> None:
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
    write_tiny_checkpoint(folder, args.family, args.num_layers, args.seed)
    files = ", ".join(sorted(path.name for path in folder.iterdir()))
    print(
        f"wrote a tiny random {args.family} ({args.num_layers} layers, seed {args.seed}) to {folder}: {files}"
    )
    print(f"load it with AutoProcessor / AutoModelForImageTextToText.from_pretrained({str(folder)!r})")
    return 0
