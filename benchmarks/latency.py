"""Latency benchmark: the same as `atp bench` (see benchmarks/README.md)."""

import sys

from atp.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
