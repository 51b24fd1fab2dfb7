"""``atp train``: the paper's recipe (Sec. 4.1) on LLaVA-format data with transformers' Trainer.

One process: ``atp train --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json
--image-folder data --output-dir out``. Many: the same under ``accelerate launch`` with one of
the configs in ``configs/accelerate/`` (docs/training.md). ``--model tiny`` trains the embedded
tiny random model on a CPU (a toy run, nothing downloaded). ``--config recipe.yaml`` reads the
options from a recipe (``configs/recipes/``; flags given too override it), ``--dry-run`` prints the
resolved plan without loading weights (atp/training/recipe.py), ``--check`` trains a few steps with
the diagnostics (atp/training/diagnostics.py), prints them and exits 1 on a warning, saving nothing.

:func:`add_parser` adds the command (its options in groups: mode, model, data, atp, optimizer,
schedule, launch), :func:`main` runs it, :func:`run` builds and trains. The data, the model family
and the images per record are checked by atp/training/inputs.py, the same for the dry run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="train ATP modules on LLaVA-format conversations")
    _mode_arguments(train)
    _model_arguments(train)
    _data_arguments(train)
    _atp_arguments(train)
    _optimizer_arguments(train)
    _schedule_arguments(train)
    _launch_arguments(train)
    _read_recipes(train)


def _mode_arguments(train: argparse.ArgumentParser) -> None:
    """``--config``, ``--dry-run``, ``--check`` and ``--check-steps``: how the command runs."""
    from atp.arguments import COUNT

    train.add_argument(
        "--config", default=None, metavar="FILE", help="a recipe (YAML of these options); flags override it"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="print the resolved plan as JSON without loading weights"
    )
    train.add_argument(
        "--check",
        action="store_true",
        help="train --check-steps steps with the diagnostics (gradients too), print them per ATP layer "
        "with OK / WARN verdicts, exit 1 on a warning; nothing is saved",
    )
    train.add_argument("--check-steps", type=COUNT, default=5, help="optimizer steps of --check (default 5)")


def _model_arguments(train: argparse.ArgumentParser) -> None:
    """The model, its dtype and attention, the policy and its ``--option``s."""
    from atp.cli.loading import ATTENTION, DTYPES
    from atp.cli.options import add_option_argument

    train.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (default, embedded), or a LLaVA-1.5 folder / hub id (safetensors)",
    )
    train.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default: by --bf16)"
    )
    train.add_argument("--attn-implementation", choices=ATTENTION, default="sdpa", help="the vision tower's")
    train.add_argument("--policy", default=None, help="policy name (default atp; fixed ratios train nothing)")
    add_option_argument(train)


def _data_arguments(train: argparse.ArgumentParser) -> None:
    """The conversations, their images, and where the run writes."""
    train.add_argument(
        "--data", default=None, help="LLaVA-format conversation JSON (llava_v1_5_mix665k); required"
    )
    train.add_argument("--image-folder", default=".", help="folder the records' image paths are relative to")
    train.add_argument(
        "--missing-images",
        choices=("error", "skip"),
        default="error",
        help="records whose image file is missing: stop before training (default) or skip them",
    )
    train.add_argument("--output-dir", default=None, help="required")


def _atp_arguments(train: argparse.ArgumentParser) -> None:
    """ATP's layers, losses and heads, the checkpoint to start from, and what trains."""
    from atp.arguments import LAYER, NON_NEGATIVE, POSITIVE

    train.add_argument("--layers", type=LAYER, nargs="+", default=None, help="ATP layers (default 4 14 24)")
    train.add_argument(
        "--lambda-atp", type=NON_NEGATIVE, default=0.05, help="weight of L_ATP (paper 0.01-0.1)"
    )
    train.add_argument(
        "--lambda-target", type=NON_NEGATIVE, default=0.2, help="weight of L_target (paper 0.2)"
    )
    train.add_argument(
        "--budget-loss",
        default=None,
        help="a registered budget loss: normalized (default: fractions, the target error squared) or "
        "paper (Eq. 12-13 as printed, in tokens); see docs/concepts.md",
    )
    train.add_argument(
        "--target-tokens",
        type=POSITIVE,
        default=None,
        help="N_target (default: a quarter of the visual tokens, 144)",
    )
    train.add_argument(
        "--lambda-sample",
        type=POSITIVE,
        default=1.0,
        help="spatial score coefficient (default 1: evenly spaced scores; paper 3, see docs/concepts.md)",
    )
    train.add_argument(
        "--temperature", type=POSITIVE, default=100.0, help="soft-mask temperature T (default 100)"
    )
    train.add_argument(
        "--atp-checkpoint",
        "--from-pretrained",
        dest="atp_checkpoint",
        default=None,
        help="an ATP checkpoint to start from",
    )
    train.add_argument(
        "--freeze-lm", action="store_true", help="train only the ATP modules (Table 3, frozen)"
    )


def _optimizer_arguments(train: argparse.ArgumentParser) -> None:
    """Learning rates, epochs and steps, batches and sequence length."""
    from atp.arguments import COUNT, MAX_STEPS, NON_NEGATIVE, POSITIVE

    train.add_argument(
        "--learning-rate", type=NON_NEGATIVE, default=2e-5, help="language model / projector (paper 2e-5)"
    )
    train.add_argument(
        "--atp-learning-rate", type=NON_NEGATIVE, default=1e-4, help="ATP modules (paper 1e-4)"
    )
    train.add_argument("--epochs", type=POSITIVE, default=1.0)
    train.add_argument("--max-steps", type=MAX_STEPS, default=-1, help="steps in all (-1: --epochs)")
    train.add_argument(
        "--batch-size", type=COUNT, default=16, help="per device (paper: 128 in total on 8 GPUs)"
    )
    train.add_argument("--grad-accum", type=COUNT, default=1)
    train.add_argument("--max-length", type=COUNT, default=2048)


def _schedule_arguments(train: argparse.ArgumentParser) -> None:
    """The sampler, warm-up, precision, checkpoints and logging, workers, DeepSpeed, resuming, seed."""
    from atp.arguments import COUNT, NON_NEGATIVE_COUNT, SEED, WARMUP

    train.add_argument(
        "--group-by-modality-length",
        action="store_true",
        help="LLaVA's sampler: text-only and image batches apart, lengths grouped",
    )
    train.add_argument("--warmup", type=WARMUP, default=0.03, help="warm-up steps, or a ratio in [0, 1)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--save-steps", type=COUNT, default=500)
    train.add_argument("--logging-steps", type=COUNT, default=10)
    train.add_argument("--workers", type=NON_NEGATIVE_COUNT, default=4, help="data loader workers")
    train.add_argument(
        "--deepspeed", default=None, help="a DeepSpeed JSON config (or use accelerate configs)"
    )
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to resume from")
    train.add_argument("--seed", type=SEED, default=42)


def _launch_arguments(train: argparse.ArgumentParser) -> None:
    """The accelerate config and world size the run is launched with (checked by ``--dry-run``)."""
    from atp.arguments import COUNT

    train.add_argument(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="the accelerate config the run is launched with (world size and checks of --dry-run)",
    )
    train.add_argument(
        "--num-processes",
        type=COUNT,
        default=None,
        help="world size for --dry-run (default: the accelerate config's)",
    )


def _read_recipes(train: argparse.ArgumentParser) -> None:
    """Let ``--config FILE`` set the defaults before the command line is parsed (flags win)."""
    from atp.training.recipe import read_recipe

    parse = train.parse_known_args
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)

    def parse_with_recipe(args=None, namespace=None):
        config = first.parse_known_args(args)[0].config
        if config is None:
            return parse(args, namespace)
        try:
            recipe = read_recipe(config, train)
        except (OSError, ValueError) as error:  # a usage error, as argparse reports its own
            train.error(str(error))
        defaults = dict(train._defaults), [(action, action.default) for action in train._actions]
        train.set_defaults(**recipe)
        try:
            return parse(args, namespace)
        finally:  # the recipe is this command line's: a parser used again starts from its own defaults
            train._defaults = defaults[0]
            for action, default in defaults[1]:
                action.default = default

    train.parse_known_args = parse_with_recipe


def load_model(name: str, bf16: bool, dtype: str | None = None, attn_implementation: str = "sdpa"):
    """The model, its tokenizer and image processor. ``tiny`` needs no download."""
    from atp.cli.loading import DTYPES, load
    from atp.training.inputs import check_llava

    dtype = dtype or ("bfloat16" if bf16 else "float32")
    if name == "tiny":
        from atp.tiny.models import TinyImageProcessor, TinyTokenizer, tiny_llava

        return tiny_llava(num_layers=4).to(DTYPES[dtype]), TinyTokenizer(), TinyImageProcessor(32)
    loaded = load(name, dtype, "cpu", attn_implementation)
    check_llava(loaded.model.config, name)
    return loaded.model, loaded.processor.tokenizer, loaded.processor.image_processor


def attach_atp(model, args: argparse.Namespace):
    """atp attached as the recipe says, CLIP frozen, and the LM too with ``--freeze-lm``."""
    from atp.cli.loading import attach_from_args

    visual = int(model.config.image_seq_length)
    policy = args.policy or ("atp" if args.atp_checkpoint is None else None)
    options = (
        {"lambda_sample": args.lambda_sample, "temperature": args.temperature} if policy == "atp" else {}
    )
    handle = attach_from_args(  # untrained heads are the starting point here: no warning
        model,
        args,
        lambda_atp=args.lambda_atp,
        lambda_target=args.lambda_target,
        target_tokens=args.target_tokens if args.target_tokens is not None else visual / 4,
        budget_loss=args.budget_loss,
        **options,
    )
    model.model.vision_tower.requires_grad_(False)  # LLaVA-1.5 fine-tuning keeps CLIP frozen
    if args.freeze_lm:
        handle.freeze_base_model()
    return handle


def run(args: argparse.Namespace, output_dir: str | None = None):
    """Build everything from the parsed arguments, train, save; returns the trainer. With
    ``--check``: ``--check-steps`` steps into ``output_dir`` with the diagnostics logged every step,
    nothing saved."""
    import torch
    from transformers import TrainingArguments

    from atp.host import compat
    from atp.training.data import LlavaCollator
    from atp.training.inputs import check_images_per_record, dataset_from_args
    from atp.training.recipe import check_launch, launch_settings
    from atp.training.trainer import AtpTrainer, check_extension_locks

    checking = getattr(args, "check", False)
    if checking and args.resume is not None:
        raise ValueError(
            "--check trains from the start; check trained heads with --atp-checkpoint FOLDER instead of --resume"
        )
    dataset = dataset_from_args(args)
    settings = launch_settings(args)
    check_launch(args, settings)
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"  # by accelerate launch
    if args.deepspeed or launched or settings.get("distributed_type") == "DEEPSPEED":
        check_extension_locks()  # before DeepSpeed's processes start (they load its ops)
    if args.model == "tiny":  # built directly (no from_pretrained), before ZeRO-3's zero.Init is set up
        model, tokenizer, image_processor = load_model(
            "tiny", args.bf16, args.dtype, args.attn_implementation
        )
    # a checkpoint after the arguments: under DeepSpeed ZeRO-3 its weights are then partitioned as
    # they load (deepspeed.zero.Init) instead of being built whole on every process; the ATP heads,
    # created after, are partitioned by deepspeed.initialize
    training_args = TrainingArguments(
        output_dir=output_dir or args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.check_steps if checking else args.max_steps,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        bf16=args.bf16,
        **compat.checkpointing_arguments(args.gradient_checkpointing),
        save_strategy="no" if checking else "steps",
        save_steps=args.save_steps,
        logging_steps=1 if checking else args.logging_steps,
        dataloader_num_workers=args.workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # CPU processes under accelerate/torchrun: gloo
        deepspeed=args.deepspeed,
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
        # unused base parameters in text-only batches: DDP must look for them when the base trains;
        # ATP parameters always join the graph, so a frozen base needs no search
        ddp_find_unused_parameters=not args.freeze_lm,
    )
    start_zero3_processes(training_args)
    if args.model != "tiny":
        model, tokenizer, image_processor = load_model(
            args.model, args.bf16, args.dtype, args.attn_implementation
        )
    visual = int(model.config.image_seq_length)
    torch.manual_seed(args.seed)  # the heads' initialisation follows --seed, whatever loading drew
    check_images_per_record(attach_atp(model, args), dataset, visual)
    collator = LlavaCollator(
        tokenizer, image_processor, model.config.image_token_id, visual, args.image_folder, args.max_length
    )
    trainer = AtpTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        atp_learning_rate=args.atp_learning_rate,
        group_by_modality_length=args.group_by_modality_length,
        atp_diagnostics="gradients" if checking else "stats",
    )
    resume = True if args.resume == "latest" else args.resume
    result = trainer.train(resume_from_checkpoint=resume)
    if checking:
        return trainer
    trainer.save_model(args.output_dir)
    trainer.atp_summary = {
        "output_dir": args.output_dir,
        "global_step": trainer.state.global_step,
        "records": len(dataset),
        "skipped_missing_images": dataset.skipped,
        **result.metrics,
    }
    return trainer


def start_zero3_processes(training_args) -> None:
    """Under ZeRO-3, set up the processes and DeepSpeed's communication now: ``from_pretrained``
    partitions the weights as they load (``deepspeed.zero.Init``), which reads the world size
    from DeepSpeed (a run on CPU processes initialises it only in ``deepspeed.initialize``)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    training_args.device  # noqa: B018 (the property sets up the process group)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()


@contextlib.contextmanager
def output_to_stderr():
    """``print`` and every logging handler that writes to a console stream other than stderr write
    to stderr while the block runs. A handler keeps the stream it was made with: DeepSpeed's logs
    to the stdout of its import, which transformers >= 5.25 does on its own import."""
    import logging

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    moved = [
        handler
        for logger in loggers
        if isinstance(logger, logging.Logger)
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler and handler.stream not in (sys.stderr, sys.__stderr__)
    ]
    streams = [handler.stream for handler in moved]
    for handler in moved:  # not setStream: it flushes the old stream, which may be closed
        handler.stream = sys.stderr
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in zip(moved, streams):
            handler.stream = stream


def main(args: argparse.Namespace) -> int:
    if args.dry_run:
        from atp.training.recipe import dry_run

        # the plan alone on stdout (`atp train --dry-run > plan.json`): what libraries print while
        # it is resolved (DeepSpeed announces its accelerator) goes to stderr
        with output_to_stderr():
            plan = dry_run(args, attach_atp)
        print(json.dumps(plan, indent=2))
        return 0
    if args.check:
        return check(args)
    trainer = run(args)
    if trainer.is_world_process_zero():
        print(json.dumps(trainer.atp_summary))
    trainer.atp_handle.remove()
    finish_distributed()
    return 0


def check(args: argparse.Namespace) -> int:
    """``atp train --check``: the diagnostics of the last checked step with images, per ATP layer,
    and a verdict per check on stdout (what training prints goes to stderr); 1 on a warning."""
    import tempfile
    import warnings

    from atp.training.diagnostics import DiagnosticWarning, verdicts

    with tempfile.TemporaryDirectory() as scratch, output_to_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # the verdicts below say them
        trainer = run(args, output_dir=scratch)
    last = trainer.atp_recorder.last
    trainer.atp_handle.remove()
    finish_distributed()
    if last is None:
        raise ValueError(
            f"no batch with images in the {args.check_steps} steps of --check; raise --check-steps"
        )
    step, diag, found = last
    if trainer.is_world_process_zero():
        print(f"atp train --check: step {step + 1} of {args.check_steps}, {diag.samples} samples with images")
        print(diag.table())
        print("\n".join(verdicts(diag, found)))
    return 1 if found else 0


def finish_distributed() -> None:
    """Wait for every process, then close the process group: a rank that exits while gloo's
    threads still serve the others aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
