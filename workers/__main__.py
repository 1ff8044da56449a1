"""``python -m workers`` runs the whole command line (the ``metering`` console script)."""

from workers.cli.main import main

if __name__ == "__main__":  # (a spawned export worker imports this module too)
    main()
