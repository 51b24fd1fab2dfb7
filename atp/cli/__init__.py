"""The ``atp`` command line: one module per command (listed in :mod:`atp.cli.app`, which builds the
parser and dispatches), the shared model loading in :mod:`atp.cli.loading`.

The library never imports this package; it imports the library.
"""

from atp.cli.app import main

__all__ = ["main"]
