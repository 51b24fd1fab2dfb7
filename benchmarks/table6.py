"""Analytic FLOPs and KV cache of LLaVA-1.5-7B at the token counts of the paper's Table 6.

The paper reports (Table 6): upper bound 576 tokens, 302.4 MB KV cache, 9.6 TFLOPs; FastV 144
tokens 75.6 MB, 2.0 T; ATP-LLaVA 144 tokens 75.6 MB, 2.1 T and 88 tokens 46.2 MB, 1.5 T. The
paper does not state its text length or FLOPs convention; this script prints both conventions
for visual tokens only (text_tokens=0) and with a 64-token prompt.
"""

import argparse
import json

from atp.core.efficiency import PRESETS, report

SCHEDULES = {  # name -> (layers, kept): the same Token metric as the paper's rows
    "upper bound (576)": ([], []),
    "FastV K=2 (144)": ([2], [round((144 * 32 - 2 * 576) / 30)]),
    "ATP-LLaVA (144)": ([4, 14, 24], [126, 88, 20]),
    "ATP-LLaVA (88)": ([1, 13, 25], [98, 79, 16]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for text_tokens in (0, 64):
        for name, (layers, kept) in SCHEDULES.items():
            for convention in ("paper", "2flops-per-mac"):
                r = report(
                    PRESETS["llava-1.5-7b"], layers, kept, text_tokens=text_tokens, convention=convention
                )
                rows.append(
                    {
                        "schedule": name,
                        "text_tokens": text_tokens,
                        "flops_convention": convention,
                        "avg_tokens": r.avg_tokens,
                        "kv_cache_MB": r.kv_cache_bytes / 1e6,
                        "TFLOPs": r.flops / 1e12,
                        "flops_saved": 1 - r.flops_ratio,
                        "kv_saved": 1 - r.kv_ratio,
                    }
                )
    if args.json:
        print(json.dumps(rows))
        return
    print(
        f"{'schedule':>18} | {'text':>4} | {'convention':>14} | {'Token':>6} | {'KV MB':>7} | {'TFLOPs':>6} | {'saved':>6}"
    )
    for row in rows:
        print(
            f"{row['schedule']:>18} | {row['text_tokens']:>4} | {row['flops_convention']:>14} | {row['avg_tokens']:>6.1f} | "
            f"{row['kv_cache_MB']:>7.1f} | {row['TFLOPs']:>6.2f} | {row['flops_saved']:>6.1%}"
        )


if __name__ == "__main__":
    main()
