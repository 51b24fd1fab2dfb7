"""How the distributed test scripts end, once every result the test reads is written."""

import os
import sys


def leave() -> None:
    """Exit at once, without the interpreter's teardown. With torch 2.14.1 a gloo rank aborted
    there ("terminate called without an active exception"), after its process group was closed
    and its results were written (seen twice in about ten launches, on a loaded machine), which
    failed the launch; what the tests check is done by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
