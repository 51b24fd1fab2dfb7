import sys

from atp.cli import main

sys.exit(main())
