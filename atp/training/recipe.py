"""``atp train --config FILE`` (a recipe: the command's options as YAML) and ``--dry-run``.

A recipe's keys are ``atp train``'s long options, with dashes or underscores (``learning-rate``,
``learning_rate``); flags on the command line override it. ``--dry-run`` resolves a run without
loading weights (the model is built on the meta device) and returns its plan: parameters and
optimizer groups, the data pipeline, world size, batch, steps, schedule and checkpoints.

The command itself is :mod:`atp.cli.train`; this module never imports the command line (it
checks the inputs with :mod:`atp.training.inputs` and is handed how atp attaches).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from atp.training.data import encode_conversation

NOT_IN_RECIPES = ("help", "config", "dry-run")


def read_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The defaults a recipe file sets, as ``{dest: value}`` for ``parser.set_defaults``; each
    value is checked as its flag's would be (``ValueError`` naming the file and the key)."""
    from atp.arguments import read_yaml

    values = read_yaml(path, "recipe")
    actions = {
        option[2:]: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option[2:] not in NOT_IN_RECIPES
    }
    unknown = sorted(str(key) for key in values if str(key).replace("_", "-") not in actions)
    if unknown:
        raise ValueError(
            f"recipe {path}: unknown key(s) {', '.join(unknown)}; the keys are atp train's long "
            f"options (see atp train --help), e.g. learning-rate or learning_rate"
        )
    return {
        actions[key.replace("_", "-")].dest: _convert(path, key, value, actions[key.replace("_", "-")])
        for key, value in values.items()
    }


def _convert(path, key: str, value, action: argparse.Action):
    """A recipe's value for ``action``, refused where the flag would refuse it: a YAML number goes
    through the flag's own type (no truncating cast), and nothing but text is read as text."""
    where = f"recipe {path}: {key}"
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"{where} is a flag: give true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):  # --option: a list of KEY=VALUE or a mapping
        import json

        if isinstance(value, dict):
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        return [str(item) for item in (value if isinstance(value, list) else [value])]
    if value is None:
        if action.default is not None:
            raise ValueError(
                f"{where} has no value; give one (default {action.default}) or leave the key out"
            )
        return None
    try:
        if action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            if not items and action.nargs == "+":
                raise ValueError(
                    f"is empty; give at least one value, e.g. {key}: [{action.default or '...'}]"
                )
            converted = [_scalar(item, action) for item in items]
        else:
            converted = _scalar(value, action)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{where} {error}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def _scalar(value, action: argparse.Action):
    """One YAML value as the flag's type reads it: a :class:`Number` takes numbers and text;
    text options take text and numbers (``output-dir: 2024``), never a bool, list or mapping."""
    from atp.arguments import Number

    if isinstance(action.type, Number):
        return action.type.check(value)
    if isinstance(value, bool):
        raise TypeError(
            f"must be text, got {str(value).lower()}; quote it ('{str(value).lower()}') if you mean the text"
        )
    if isinstance(value, (list, dict)):
        raise TypeError(f"must be one value, got a {type(value).__name__} {value!r}")
    return (action.type or str)(str(value))


def launch_settings(args) -> dict:
    """World size, precision and DeepSpeed settings from ``--accelerate-config`` and ``--deepspeed``
    (``ValueError`` naming the file and the entry that is not what accelerate / DeepSpeed take)."""
    from atp.arguments import COUNT, read_json, read_yaml

    settings = {"accelerate_config": args.accelerate_config, "num_processes": 1}
    if args.accelerate_config:
        path = args.accelerate_config
        config = read_yaml(path, "accelerate config")
        deepspeed = _section(config, "deepspeed_config", path, "accelerate config")
        settings.update(
            distributed_type=config.get("distributed_type"),
            num_processes=_entry(COUNT, config.get("num_processes", 1), "num_processes", path),
            mixed_precision=config.get("mixed_precision"),
            zero_stage=deepspeed.get("zero_stage"),
            deepspeed_gradient_accumulation_steps=_accumulation(deepspeed, path),
        )
    if args.deepspeed:
        config = read_json(args.deepspeed, "DeepSpeed config")
        settings["zero_stage"] = _section(
            config, "zero_optimization", args.deepspeed, "DeepSpeed config"
        ).get("stage")
        settings["deepspeed_gradient_accumulation_steps"] = _accumulation(config, args.deepspeed)
    if args.num_processes is not None:
        settings["num_processes"] = args.num_processes
    return settings


def _section(config: dict, key: str, path, what: str) -> dict:
    """``config[key]``, a mapping (``{}`` when absent)."""
    section = config.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{what} {path}: {key} must be a mapping of settings, got {section!r}")
    return section


def _entry(number, value, key: str, path):
    """A number entry of a launch config, checked as the flag of the same meaning."""
    try:
        return number.check(value, key)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}; fix the file") from None


def _accumulation(config: dict, path):
    """A config's gradient_accumulation_steps: absent (None), "auto" or a count."""
    from atp.arguments import COUNT

    value = config.get("gradient_accumulation_steps")
    return value if value in (None, "auto") else _entry(COUNT, value, "gradient_accumulation_steps", path)


def check_launch(args, settings: dict) -> list[str]:
    """The consistency checks passed; ``ValueError`` naming every one that fails."""
    problems, passed = [], []
    accumulation = settings.get("deepspeed_gradient_accumulation_steps")
    if accumulation not in (None, "auto") and accumulation != args.grad_accum:
        problems.append(
            f"DeepSpeed gradient_accumulation_steps is {accumulation} but --grad-accum is {args.grad_accum}; "
            "make them equal"
        )
    elif accumulation is not None:
        passed.append(
            f"DeepSpeed gradient_accumulation_steps {accumulation} matches --grad-accum {args.grad_accum}"
        )
    precision = settings.get("mixed_precision")
    if precision in ("bf16", "no") and (precision == "bf16") != args.bf16:
        problems.append(
            f"the accelerate config's mixed_precision is {precision!r} but --bf16 is {'on' if args.bf16 else 'off'}; "
            "make them agree"
        )
    elif precision is not None:
        passed.append(f"mixed_precision {precision!r} matches --bf16")
    if settings["num_processes"] < 1:
        problems.append(f"num_processes must be >= 1, got {settings['num_processes']}")
    if problems:
        raise ValueError("; ".join(problems))
    return passed


def check_zero3_grouping(args, settings: dict, dataset) -> str | None:
    """ZeRO-3 on several processes cannot train a step whose ranks disagree on images (the run
    refuses it before its first step, see ``AtpTrainer``): mixed data needs modality grouping."""
    if settings.get("zero_stage") != 3 or settings["num_processes"] < 2:
        return None
    with_images = int((dataset.image_counts > 0).sum())
    if 0 < with_images < len(dataset) and not args.group_by_modality_length:
        raise ValueError(
            f"DeepSpeed ZeRO-3 on {settings['num_processes']} processes with data that mixes records with "
            "and without images needs --group-by-modality-length (a step where one rank has images and "
            "another none would hang)"
        )
    return "ZeRO-3: every step is of one modality on all processes (--group-by-modality-length)"


def launch_command(args) -> str:
    """How to start the run this plan describes."""
    command = (
        "atp train"
        if not args.accelerate_config
        else (f"accelerate launch --config_file {args.accelerate_config} -m atp train")
    )
    return f"{command} --config {args.config}" if args.config else f"{command} ... (these options)"


def schedule(records: int, args, world_size: int) -> dict:
    """Steps as the Trainer counts them (accelerate gives each process ceil(batches / processes))."""
    batches = math.ceil(records / args.batch_size)
    per_process = math.ceil(batches / world_size)
    steps_per_epoch = max(math.ceil(per_process / args.grad_accum), 1)
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.epochs * steps_per_epoch)
    warmup = int(args.warmup) if args.warmup >= 1 else math.ceil(total * args.warmup)
    return {
        "world_size": world_size,
        "per_device_batch": args.batch_size,
        "grad_accum": args.grad_accum,
        "global_batch": args.batch_size * world_size * args.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "epochs": args.epochs,
        "total_steps": total,
        "warmup_steps": warmup,
        "scheduler": "cosine",
        "learning_rate": args.learning_rate,
        "atp_learning_rate": args.atp_learning_rate,
        "save_steps": args.save_steps,
        "checkpoints": total // args.save_steps + int(total % args.save_steps > 0),
        "sampler": "group_by_modality_length" if args.group_by_modality_length else "random",
    }


def model_on_meta(name: str):
    """The model built from its config on the meta device (no weights read), and the processor
    when the folder / hub has one (else the reason it has not)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if name == "tiny":
        from atp.tiny.models import TinyTokenizer, tiny_llava

        config, processor = tiny_llava(num_layers=4).config, TinyTokenizer()
    else:
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not read the config of {name!r}: {error}") from error
        try:
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as error:
            processor = f"not loaded ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model, processor


def sample_token_lengths(dataset, collator, count: int = 16) -> dict:
    """Tokenise the first records and the longest (by characters) of each modality with the collator's
    template; their token lengths and how many ``max_length`` cuts (``ValueError`` when a cut
    would fall inside the image tokens or remove every answer, as training would)."""
    import numpy as np

    picks = set(range(min(count // 2, len(dataset))))
    for mask in (dataset.image_counts > 0, dataset.image_counts == 0):
        picks.update(
            np.flatnonzero(mask)[np.argsort(-dataset.lengths[mask], kind="stable")[: count // 4]].tolist()
        )
    lengths = []
    for index in sorted(picks):
        record = dataset[index]
        ids, _ = encode_conversation(
            record,
            collator._tokenize,
            collator.tokenizer.bos_token_id,
            collator.tokenizer.eos_token_id,
            collator.image_token_id,
            collator.image_seq_length,
        )
        collator.encode(record)  # raises where max_length cuts the image tokens or every answer
        lengths.append(len(ids))
    lengths = np.asarray(lengths or [0])
    return {
        "sampled": len(picks),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 1),
        "max": int(lengths.max()),
        "cut_by_max_length": int((lengths > collator.max_length).sum()),
        "max_length": collator.max_length,
    }


def dry_run(args, attach) -> dict:
    """The plan of ``atp train`` with these arguments, resolved without loading weights;
    ``attach(model, args)`` attaches atp as the run would (``atp train`` passes its own,
    ``atp.cli.train.attach_atp``) and returns the handle."""
    from atp.training.data import LlavaCollator
    from atp.training.inputs import check_images_per_record, check_llava, dataset_from_args

    settings = launch_settings(args)
    passed = check_launch(args, settings)
    started = time.perf_counter()
    dataset = dataset_from_args(args, quiet=True)
    index_seconds = time.perf_counter() - started
    model, processor = model_on_meta(args.model)
    check_llava(model.config, args.model)
    handle = attach(model, args)
    visual = int(model.config.image_seq_length)
    check_images_per_record(handle, dataset, visual)
    grouping = check_zero3_grouping(args, settings, dataset)
    if grouping:
        passed.append(grouping)
    groups = handle.param_groups(lr=args.learning_rate, atp_lr=args.atp_learning_rate, weight_decay=0.0)
    atp_ids = {id(p) for p in handle.parameters()}
    data = dataset.summary()
    data.update(
        file=str(args.data),
        image_folder=str(args.image_folder),
        missing_images=args.missing_images,
        index_seconds=round(index_seconds, 3),
        index_bytes=int(
            sum(a.nbytes for a in (dataset.offsets, dataset.sizes, dataset.image_counts, dataset.lengths))
        ),
    )
    if isinstance(processor, str):
        tokens = {"processor": processor}
    else:
        tokenizer = getattr(processor, "tokenizer", processor)
        collator = LlavaCollator(
            tokenizer, None, model.config.image_token_id, visual, args.image_folder, args.max_length
        )
        tokens = sample_token_lengths(dataset, collator)
        passed.append(
            f"max_length {args.max_length} cuts no image tokens in {tokens['sampled']} sampled records"
        )
    target = handle.budget.target_tokens
    if target is not None and not 0 < target <= visual:
        raise ValueError(
            f"--target-tokens {target} must be in (0, {visual}], the model's visual tokens per image"
        )
    passed.append(f"target_tokens {target} <= {visual} visual tokens per image")
    plan = {
        "model": {
            "name": args.model,
            "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in handle.base_parameters()),
            "trainable": sum(p.numel() for group in groups for p in group["params"]),
            "atp_parameters": sum(p.numel() for p in handle.parameters()),
            "num_layers": int(model.config.text_config.num_hidden_layers),
            "hidden_size": int(model.config.text_config.hidden_size),
            "visual_tokens": visual,
            "trains": "atp only" if args.freeze_lm else "atp, language model and projector (CLIP frozen)",
        },
        "atp": {k: v for k, v in handle.config().items() if k not in ("atp_version", "model")},
        "optimizer": [
            {
                "group": "atp" if all(id(p) in atp_ids for p in group["params"]) else "base",
                "lr": group["lr"],
                "tensors": len(group["params"]),
                "parameters": sum(p.numel() for p in group["params"]),
            }
            for group in groups
        ],
        "data": data,
        "tokens": tokens,
        "launch": {**settings, "command": launch_command(args)},
        "schedule": schedule(len(dataset), args, settings["num_processes"]),
        "checks": passed,
    }
    handle.remove()
    return plan
