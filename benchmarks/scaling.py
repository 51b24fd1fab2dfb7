"""The scaling run: the same as `python -m atp.scaling` (see benchmarks/README.md)."""

import sys

from atp.scaling import main

sys.exit(main(sys.argv[1:]))
