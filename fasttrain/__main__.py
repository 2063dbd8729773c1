"""`python -m fasttrain TOOL ...`: the `fasttrain` command (fasttrain/cli.py) without its console script.

Imports from fasttrain: cli.
"""

from fasttrain.cli import entry_point

entry_point("python -m fasttrain")
