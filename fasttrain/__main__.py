"""`python -m fasttrain TOOL ...`: the `fasttrain` command (fasttrain/cli.py) without its console script."""

from fasttrain.cli import entry_point

entry_point()
