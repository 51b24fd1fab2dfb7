"""The end-to-end study: does adaptive pruning learn? (``python -m atp.study``)

Per seed, each stage trained with the library's own path (``atp.attach`` + ``AtpTrainer``) and
saved, so a stopped run resumes where it was (a stage whose ``result.json`` exists is skipped):

1. ``base``: a small LLaVA (transformers ``LlavaForConditionalGeneration``: CLIP-style tower,
   projector, Llama) trained from scratch on the shapes questions, nothing pruned;
2. ``oracle``: no training; the base model keeping a fraction of the visual tokens from a first
   ATP layer on (random, redundancy-ranked and grid policies), per question type
   (:mod:`atp.study.oracle`): whether what is kept after the first ATP layer matters at all;
3. the untrained baselines at the same Token metric (FastV, PDrop, spatial, random, pooling;
   settings from :func:`atp.evaluation.matched.matched_methods`) on the base model;
4. ``atp_frozen`` / ``atp_full``: the ATP modules trained with the budget loss at a target of
   ``fraction`` of the visual tokens, the LM frozen / fine-tuned;
5. ``control``: the same policy with a ``constant`` threshold head (thresholds learned per layer,
   the same for every input), trained as ``atp_frozen`` is: the control for instance-wise
   adaptivity;
6. ``fixed_trained``: fixed ratios at the same layers at the same Token metric, the LM fine-tuned
   with them as ``atp_full`` is (the paper's Table 2).

Each is evaluated per question type on held-out examples (accuracy, kept tokens per ATP layer,
the thresholds' mean and spread over the questions); each learned stage also records its soft
and hard Token metric on a training batch. :mod:`atp.study.report` writes the tables, the plots
and the verdicts.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from atp.study import oracle
from atp.study.evaluate import evaluate
from atp.study.processor import save_processor
from atp.study.shapes import IMAGE, TYPES, VOCAB, ShapesCollator, ShapesDataset, example

STAGES = ("base", "oracle", "baselines", "atp_frozen", "atp_full", "control", "fixed_trained")
# learned stages: (threshold head, LM frozen); each trained with the same budget loss and schedule
LEARNED = {"atp_frozen": ("paper", True), "atp_full": ("paper", False), "control": ("constant", True)}


@dataclass
class StudyConfig:
    """Sizes and schedules; the defaults are the CPU study (docs/study.md)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    image_size: int = 48
    patch_size: int = 4  # (48 / 4)^2 = 144 visual tokens
    num_layers: int = 8  # deep enough that a quarter is reachable after layer 0
    hidden_size: int = 96
    vision_hidden_size: int = 64
    init_std: float = (
        0.1  # about 1 / sqrt(width); transformers' 0.02 kept the model at chance for 1000s of steps
    )
    layers: tuple[int, ...] = (1, 4, 6)  # the paper's 4 / 14 / 24 of 32, scaled
    # the target Token metric, of the visual tokens: 24.5 of 144, no grid's density (a stride-4 grid
    # from layer 1 on gives 25.9), where the oracle's random pruning costs some question types
    # 10 points or more (docs/study.md)
    fraction: float = 0.17
    batch_size: int = 32
    base_steps: int = 1000
    base_lr: float = 2e-3
    prune_steps: int = 300
    finetune_lr: float = 2e-4
    atp_lr: float = 1e-2
    lambda_atp: float = 0.05
    lambda_target: float = 5.0  # on the normalised budget loss (1 left seed 0 at Token 31.3 for 24.5)
    init_theta_r: float = 0.5  # the library's defaults: both branches decide about some tokens
    init_theta_s: float = 0.5
    eval_per_type: int = 100
    layout: str = "image_first"  # where the question sits in the prompt (atp.study.shapes.encode)
    threads: int = 2
    stages: tuple[str, ...] = STAGES
    oracle_layers: tuple[int, ...] = (1, 2)  # first ATP layers the oracle tries
    oracle_fractions: tuple[float, ...] = oracle.FRACTIONS
    oracle_strides: tuple[int, ...] = oracle.STRIDES
    atp_options: dict = field(default_factory=dict)  # more options of the atp policy (every learned stage)

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_model(config: StudyConfig, seed: int):
    """A random ``LlavaForConditionalGeneration``: a 2-layer CLIP tower, the projector, a Llama."""
    from atp.tiny.models import tiny_llava

    return tiny_llava(
        num_layers=config.num_layers,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        seed=seed,
        vocab_size=len(VOCAB),
        image_token_id=IMAGE,
        vision_hidden_size=config.vision_hidden_size,
        initializer_range=config.init_std,
    )


def test_examples(config: StudyConfig, seed: int) -> list:
    return [
        example(seed, "test", index, config.image_size, kind, config.layout)
        for kind in TYPES
        for index in range(config.eval_per_type)
    ]


def _arguments(output: Path, config: StudyConfig, steps: int, lr: float, seed: int, progress: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )


def train(model, handle, config: StudyConfig, output: Path, steps: int, lr: float, seed: int, progress: bool):
    """``AtpTrainer`` on the shapes training split (a seed of its own per stage)."""
    from atp.training import AtpTrainer

    data = ShapesDataset(seed, "train", steps * config.batch_size, config.image_size, layout=config.layout)
    trainer = AtpTrainer(
        model=model,
        args=_arguments(output, config, steps, lr, seed, progress),
        train_dataset=data,
        data_collator=ShapesCollator(config.visual_tokens),
        atp_learning_rate=config.atp_lr,
    )
    trainer.train()
    model.eval()
    return trainer


def _attach(model, policy: str, config: StudyConfig, **options):
    from atp.host.attach import attach

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained heads, before training
        return attach(model, policy=policy, **options)


def soft_hard_tokens(model, handle, config: StudyConfig, seed: int) -> dict:
    """The Token metric of one training batch (the first of the stage's training split) in a
    training-mode forward with labels: ``hard`` counts the tokens kept (what inference keeps and
    the budget loss counts), ``soft`` sums the soft masks (what their gradient sees)."""
    from atp.components import average_tokens

    batch = ShapesCollator(config.visual_tokens)(
        [
            example(seed, "train", index, config.image_size, layout=config.layout)
            for index in range(config.batch_size)
        ]
    )
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model(**batch)
        stats = handle.stats
        soft = average_tokens(stats.soft_kept, stats.num_visual, stats.layers, stats.num_layers)
        return {
            "hard": float(stats.tokens_per_sample.mean()),
            "soft": float(soft.mean()),
            "target": config.fraction * config.visual_tokens,
        }
    finally:
        model.train(was_training)


def _stage(folder: Path, name: str, work, log) -> dict:
    """Run ``work()`` unless ``folder/name/result.json`` exists; record wall and CPU seconds."""
    done = folder / name / "result.json"
    if done.exists():
        log(f"{folder.name} {name}: done before, skipped")
        return json.loads(done.read_text())
    (folder / name).mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = work(folder / name)
    result["seconds"] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    done.write_text(json.dumps(result, indent=2))
    if "rows" in result:  # the oracle
        log(f"{folder.name} {name}: {len(result['rows'])} settings, {result['seconds']['wall']:.0f} s")
    else:
        log(
            f"{folder.name} {name}: accuracy {result.get('accuracy', float('nan')):.3f}, "
            f"Token {result.get('avg_tokens', float('nan')):.1f}, {result['seconds']['wall']:.0f} s"
        )
    return result


def _load_base(folder: Path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        folder / "base" / "model", attn_implementation="sdpa"
    )
    return model.eval()


def run_seed(config: StudyConfig, seed: int, output: Path, log=print, progress: bool = False) -> dict:
    """Every stage of one seed; returns ``{stage or method: result}``."""
    from atp.evaluation.arguments import parse_model_arguments, split_model_args
    from atp.evaluation.matched import matched_methods

    folder = output / f"seed{seed}"
    tests = test_examples(config, seed)
    target = config.fraction * config.visual_tokens
    results: dict[str, dict] = {}

    def base(stage: Path) -> dict:
        model = build_model(config, seed)
        handle = _attach(model, "keep_all", config)
        train(model, handle, config, stage, config.base_steps, config.base_lr, seed, progress)
        handle.remove()
        model.save_pretrained(stage / "model")
        save_processor(
            stage / "model", config.image_size, config.patch_size, config.layout
        )  # for atp visualize
        return evaluate(model, tests).to_dict()

    results["unpruned"] = _stage(folder, "base", base, log)

    if "oracle" in config.stages:

        def measured(stage: Path) -> dict:
            model = _load_base(folder)
            return oracle.measure(
                model,
                tests,
                first_layers=config.oracle_layers,
                fractions=config.oracle_fractions,
                strides=config.oracle_strides,
                seed=seed,
            )

        results["oracle"] = _stage(folder, "oracle", measured, log)

    if "baselines" in config.stages:
        for method in matched_methods(config.num_layers, config.fraction):
            if method.name == "unpruned" or method.model_args is None:
                continue

            def baseline(stage: Path, method=method) -> dict:
                model = _load_base(folder)
                args = parse_model_arguments(pretrained="-", **split_model_args(method.model_args))
                handle = _attach(model, args.policy, config, layers=args.layers, **_options(args.options))
                scores = evaluate(model, tests, handle)
                handle.remove()
                return {**scores.to_dict(), "model_args": method.model_args}

            results[method.name] = _stage(folder, method.name, baseline, log)

    atp_options = dict(
        layers=list(config.layers),
        lambda_atp=config.lambda_atp,
        lambda_target=config.lambda_target,
        target_tokens=target,
        init_theta_r=config.init_theta_r,
        init_theta_s=config.init_theta_s,
        **config.atp_options,
    )
    for name, (head, frozen) in LEARNED.items():
        if name not in config.stages:
            continue

        def learned(stage: Path, head=head, frozen=frozen) -> dict:
            model = _load_base(folder)
            handle = _attach(model, "atp", config, **atp_options, threshold_head=head)
            if frozen:
                handle.freeze_base_model()
            model.train()
            train(model, handle, config, stage, config.prune_steps, config.finetune_lr, seed + 100, progress)
            handle.save_pretrained(stage / "atp")
            scores = evaluate(model, tests, handle)
            budget = soft_hard_tokens(model, handle, config, seed + 100)
            handle.remove()
            return {**scores.to_dict(), "threshold_head": head, "frozen": frozen, "budget": budget}

        results[name] = _stage(folder, name, learned, log)

    if "fixed_trained" in config.stages:
        fixed = next(m for m in matched_methods(config.num_layers, config.fraction) if m.name == "fixed")

        def fixed_trained(stage: Path) -> dict:
            model = _load_base(folder)
            args = parse_model_arguments(pretrained="-", **split_model_args(fixed.model_args))
            handle = _attach(model, "fixed", config, layers=args.layers, **_options(args.options))
            model.train()
            train(model, handle, config, stage, config.prune_steps, config.finetune_lr, seed + 100, progress)
            scores = evaluate(model, tests, handle)
            budget = soft_hard_tokens(model, handle, config, seed + 100)
            handle.remove()
            return {**scores.to_dict(), "model_args": fixed.model_args, "budget": budget}

        results["fixed_trained"] = _stage(folder, "fixed_trained", fixed_trained, log)
    return results


def _options(pairs: list[str]) -> dict:
    from atp.cli.app import parse_options

    return parse_options(pairs, None) if pairs else {}


def run(config: StudyConfig, output, progress: bool = True, log=print) -> dict:
    """The whole study: every seed, then the report."""
    from atp.study.report import verdicts, write_report

    torch.set_num_threads(config.threads)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(asdict(config), indent=2))
    started = time.perf_counter()
    per_seed = {seed: run_seed(config, seed, output, log, progress) for seed in config.seeds}
    record = {
        "config": asdict(config),
        "seeds": {str(s): r for s, r in per_seed.items()},
        "total_wall_seconds": time.perf_counter() - started,
    }
    record["verdicts"] = verdicts(record)
    for verdict in record["verdicts"].values():
        log(verdict["sentence"])
    (output / "study.json").write_text(json.dumps(record, indent=2))
    write_report(record, output)
    return record


def build_parser():
    import argparse

    from atp.arguments import SEED

    parser = argparse.ArgumentParser(prog="python -m atp.study", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", default="runs/study", help="folder of checkpoints, results and the report"
    )
    parser.add_argument("--seeds", type=SEED, nargs="+", default=None)
    parser.add_argument("--toy", action="store_true", help="seconds, not minutes: a smoke run of every stage")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a StudyConfig field (JSON value), e.g. --set base_steps=4000",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = toy_config() if args.toy else StudyConfig()
    for pair in args.set:
        key, _, value = pair.partition("=")
        if key not in StudyConfig.__dataclass_fields__:
            parser.error(f"--set: no field {key!r}; fields: {', '.join(StudyConfig.__dataclass_fields__)}")
        parsed = json.loads(value)
        setattr(config, key, tuple(parsed) if isinstance(parsed, list) else parsed)
    if args.seeds:
        config.seeds = tuple(args.seeds)
    run(config, args.output)
    return 0


def toy_config() -> StudyConfig:
    return StudyConfig(
        seeds=(0, 1),
        image_size=16,
        patch_size=4,
        hidden_size=32,
        batch_size=4,
        base_steps=4,
        prune_steps=3,
        eval_per_type=2,
    )
