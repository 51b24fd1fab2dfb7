"""``atp flops``: the analytic FLOPs, KV cache and Token metric of a pruning schedule.

No model is loaded: the shape comes from a preset or a transformers config (:mod:`atp.core.efficiency`).
:func:`add_parser` adds the command, :func:`main` runs it.
"""

from __future__ import annotations

import math


def add_parser(sub) -> None:
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


def main(args) -> int:
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
