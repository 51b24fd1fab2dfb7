import sys

from atp.study.run import main

sys.exit(main())
