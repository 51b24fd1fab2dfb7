"""The scaling run: the same as `python -m atp.cli.scaling` (see benchmarks/README.md)."""

import sys

from atp.cli.scaling import main

sys.exit(main(sys.argv[1:]))
