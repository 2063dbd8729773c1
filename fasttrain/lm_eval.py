"""lm-eval's own command line with fasttrain's model in it: `lm_eval --model fasttrain ...` for fasttrain runs.

Imports from fasttrain: system.errors.

    python -m fasttrain.lm_eval --model fasttrain --model_args run=runs/base,device=cpu --tasks hellaswag,arc_easy
    python -m fasttrain.lm_eval ls tasks

Everything after the module name is lm-eval's. `lm_eval --model fasttrain` itself cannot work: lm-eval 0.4.13 finds
models in a fixed table and reads no plugin entry points, so another package's model exists only once it is imported,
which this module does (evaluation/harness.py registers `fasttrain`) before handing over. `fasttrain evaluate RUN
--tasks ...` gives the same scores.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from fasttrain.system.errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    importlib.import_module("fasttrain.evaluation.harness")  # registers the model; one line if lm-eval is missing
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    run_cli(main)
