"""GEMM throughput by row count: how fast a pruned layer's matrix products run per FLOP.

The FFN of the bench model (1024 -> 2752 -> 1024) at the row counts a pruned prefill has
(624 unpruned; 336, 174, 122 after atp's layers; 48 text only), with one weight pair reused
(cached) or 12 distinct pairs in turn (streamed from memory, as in a forward). Prints GFLOP/s;
docs/benchmarks.md uses it to split the gap between the time and FLOPs ratios.

    python benchmarks/gemm_rows.py [--threads N]
"""

import json
import statistics
import sys
import time

import torch

from atp.core.measure import pin_threads

pin_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else None)
D, F = 1024, 2752
weights = [(torch.randn(F, D), torch.randn(D, F)) for _ in range(12)]  # 12 layers' FFN pairs: 270 MB
out = {}
for M in [624, 336, 174, 122, 48]:
    x = torch.randn(M, D)
    y = torch.randn(M, F)

    def cached(x=x, y=y):
        w1, w2 = weights[0]
        for _ in range(12):
            torch.nn.functional.linear(x, w1)
            torch.nn.functional.linear(y, w2)

    def streamed(x=x, y=y):
        for w1, w2 in weights:
            torch.nn.functional.linear(x, w1)
            torch.nn.functional.linear(y, w2)

    res = {}
    for name, fn in (("cached", cached), ("streamed", streamed)):
        fn()
        ts = []
        for _ in range(7):
            b = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - b)
        res[name] = statistics.median(ts) * 1000
    out[M] = res
    print(
        M,
        {k: f"{v:.1f} ms" for k, v in res.items()},
        {k: f"{12 * 2 * 2 * M * D * F / (v / 1000) / 1e9:.0f} GFLOP/s" for k, v in res.items()},
    )
print(json.dumps(out))
