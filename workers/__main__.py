"""``python -m workers`` runs the whole command line (the ``metering`` console script)."""

from workers.cli import main

main()
