"""The whole command line (the ``metering`` console script): ``main`` assembles it, ``plumbing`` holds its
errors, exit codes, ``--json`` output and escaping; one module per command group."""
