"""``python -m metering`` runs the whole command line (the ``metering`` console script).

This entry point sits above every layer: nothing imports it, so the rule that ``metering`` imports no
``workers`` module (tests/test_layers.py) holds for the library and exempts this file alone.
"""

from workers.cli.main import main

main()
