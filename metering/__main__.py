"""``python -m metering`` runs the command line."""

from metering.cli import main

main()
