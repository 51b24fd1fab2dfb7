"""What a training run reads, checked before anything trains: the dataset named by the arguments
(:func:`dataset_from_args`, its paths checked by :func:`check_paths`), the model family
(:func:`check_llava`) and the images per record against the threshold heads
(:func:`check_images_per_record`).

``args`` are ``atp train``'s parsed options (:mod:`atp.cli.train`); the real run and the dry run
(:func:`atp.training.recipe.dry_run`) check the same way.
"""

from __future__ import annotations

import argparse
import os
import sys


def check_llava(config, name: str) -> None:
    """``atp train``'s data pipeline is LLaVA-1.5's: a model of another family is refused, by name."""
    if config.model_type != "llava":
        raise ValueError(
            f"atp train's data pipeline is LLaVA-1.5's (one <image> expanded to image_seq_length tokens); "
            f"{name} is a {config.model_type!r} model. Train other families with AtpTrainer "
            "and the family's processor (docs/training.md)"
        )


def dataset_from_args(args: argparse.Namespace, quiet: bool = False):
    """The indexed dataset; records with a missing image raise or are skipped (``--missing-images``)."""
    from atp.training.data import ConversationDataset

    for option in ("data",) if getattr(args, "check", False) else ("data", "output_dir"):
        if getattr(args, option) is None:
            raise ValueError(
                f"atp train needs --{option.replace('_', '-')} (on the command line or in --config)"
            )
    check_paths(args)
    dataset = ConversationDataset(args.data, args.image_folder, args.missing_images)
    if dataset.skipped and not quiet and int(os.environ.get("RANK", "0")) == 0:
        examples = [path for _, _, path in dataset.missing[:3]]
        print(
            f"atp train: skipped {dataset.skipped} records with missing images (e.g. {examples})",
            file=sys.stderr,
        )
    return dataset


def check_paths(args: argparse.Namespace) -> None:
    """The files and folders the run reads exist and are of the right kind (``ValueError`` naming
    the path and its flag), before anything is indexed or loaded."""
    from pathlib import Path

    data, images = Path(args.data), Path(args.image_folder)
    if not data.is_file():
        found = "is a folder" if data.is_dir() else "does not exist"
        raise ValueError(f"--data {data} {found}; give the LLaVA-format conversation JSON file")
    if not images.is_dir():
        found = "is a file" if images.exists() else "does not exist"
        raise ValueError(
            f"--image-folder {images} {found}; give the folder the records' image paths are relative to"
        )
    if args.atp_checkpoint is not None:
        from atp.host.checkpoint import read_config

        read_config(args.atp_checkpoint)  # names the folder and what it lacks
    if args.resume not in (None, "latest") and not Path(args.resume).is_dir():
        raise ValueError(
            f"--resume {args.resume} is not a folder; give 'latest' or a checkpoint-N folder of --output-dir"
        )


def check_images_per_record(handle, dataset, visual: int) -> None:
    """Records with several images give ``images x visual`` visual tokens in one sample: refuse,
    before training, threshold heads built for fewer (the paper's head takes a fixed count)."""
    most = int(dataset.image_counts.max()) if len(dataset) else 0
    fixed = [getattr(head, "num_visual_tokens", None) for head in getattr(handle.policy, "heads", ())]
    fixed = [count for count in fixed if count is not None and count < most * visual]
    if fixed:
        several = int((dataset.image_counts > 1).sum())
        raise ValueError(
            f"{several} records have several images (up to {most}, {most * visual} visual tokens per sample) "
            f"but the threshold heads take at most {fixed[0]} (the paper's fixed-size head); pass "
            "--option threshold_head=binned (size-agnostic), or drop those records"
        )
