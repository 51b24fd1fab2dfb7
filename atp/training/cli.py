"""``atp train``: the paper's recipe (Sec. 4.1) on LLaVA-format data with transformers' Trainer.

One process: ``atp train --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json
--image-folder data --output-dir out``. Many: the same under ``accelerate launch`` with one of
the configs in ``configs/accelerate/`` (docs/training.md). ``--model tiny`` trains the embedded
tiny random model on a CPU (a toy run, nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    from atp.cli import add_option_argument
    from atp.loading import ATTENTION, DTYPES

    train = sub.add_parser("train", help="train ATP modules on LLaVA-format conversations")
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
    train.add_argument("--data", required=True, help="LLaVA-format conversation JSON (llava_v1_5_mix665k)")
    train.add_argument("--image-folder", default=".", help="folder the records' image paths are relative to")
    train.add_argument("--output-dir", required=True)
    train.add_argument("--layers", type=int, nargs="+", default=None, help="ATP layers (default 4 14 24)")
    train.add_argument("--lambda-atp", type=float, default=0.05, help="weight of L_ATP (paper 0.01-0.1)")
    train.add_argument("--lambda-target", type=float, default=0.2, help="weight of L_target (paper 0.2)")
    train.add_argument(
        "--target-tokens",
        type=float,
        default=None,
        help="N_target (default: a quarter of the visual tokens, 144)",
    )
    train.add_argument("--lambda-sample", type=float, default=3.0, help="spatial score coefficient (paper 3)")
    train.add_argument("--temperature", type=float, default=50.0, help="soft-mask temperature T")
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
    train.add_argument(
        "--learning-rate", type=float, default=2e-5, help="language model / projector (paper 2e-5)"
    )
    train.add_argument("--atp-learning-rate", type=float, default=1e-4, help="ATP modules (paper 1e-4)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1)
    train.add_argument(
        "--batch-size", type=int, default=16, help="per device (paper: 128 in total on 8 GPUs)"
    )
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--max-length", type=int, default=2048)
    train.add_argument("--warmup", type=float, default=0.03, help="warm-up steps, or a ratio in [0, 1)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--workers", type=int, default=4, help="data loader workers")
    train.add_argument(
        "--deepspeed", default=None, help="a DeepSpeed JSON config (or use accelerate configs)"
    )
    train.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to resume from")
    train.add_argument("--seed", type=int, default=42)


def load_model(name: str, bf16: bool, dtype: str | None = None, attn_implementation: str = "sdpa"):
    """The model, its tokenizer and image processor. ``tiny`` needs no download."""
    from atp.loading import DTYPES, load

    dtype = dtype or ("bfloat16" if bf16 else "float32")
    if name == "tiny":
        from atp.testing import TinyImageProcessor, TinyTokenizer, tiny_llava

        return tiny_llava(num_layers=4).to(DTYPES[dtype]), TinyTokenizer(), TinyImageProcessor(32)
    loaded = load(name, dtype, "cpu", attn_implementation)
    if loaded.model.config.model_type != "llava":
        raise ValueError(
            f"atp train's data pipeline is LLaVA-1.5's (one <image> expanded to image_seq_length tokens); "
            f"{name} is a {loaded.model.config.model_type!r} model. Train other families with AtpTrainer "
            "and the family's processor (docs/training.md)"
        )
    return loaded.model, loaded.processor.tokenizer, loaded.processor.image_processor


def run(args: argparse.Namespace):
    """Build everything from the parsed arguments, train, save; returns the trainer."""
    import torch
    from transformers import TrainingArguments

    from atp import compat
    from atp.loading import attach_from_args
    from atp.training.data import ConversationDataset, LlavaCollator
    from atp.training.trainer import AtpTrainer

    dataset = ConversationDataset(args.data)
    folder = Path(args.image_folder)
    missing = [r["image"] for r in dataset.records if r.get("image") and not (folder / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images not found under {folder}, e.g. {missing[:3]}")
    model, tokenizer, image_processor = load_model(
        args.model, args.bf16, args.dtype, args.attn_implementation
    )
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
        **options,
    )
    model.model.vision_tower.requires_grad_(False)  # LLaVA-1.5 fine-tuning keeps CLIP frozen
    if args.freeze_lm:
        handle.freeze_base_model()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_steps=args.warmup,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        bf16=args.bf16,
        **compat.checkpointing_arguments(args.gradient_checkpointing),
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
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
    collator = LlavaCollator(
        tokenizer, image_processor, model.config.image_token_id, visual, args.image_folder, args.max_length
    )
    trainer = AtpTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        atp_learning_rate=args.atp_learning_rate,
    )
    resume = True if args.resume == "latest" else args.resume
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    trainer.atp_summary = {
        "output_dir": args.output_dir,
        "global_step": trainer.state.global_step,
        **result.metrics,
    }
    return trainer


def main(args: argparse.Namespace) -> int:
    trainer = run(args)
    if trainer.is_world_process_zero():
        print(json.dumps(trainer.atp_summary))
    trainer.atp_handle.remove()
    finish_distributed()
    return 0


def finish_distributed() -> None:
    """Wait for every process, then close the process group: a rank that exits while gloo's
    threads still serve the others aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
