"""lm-eval's own command line with fasttrain's model in it: `lm_eval --model fasttrain ...` for fasttrain runs.

Imports from fasttrain: system.errors.

    python -m fasttrain.lm_eval --model fasttrain --model_args run=runs/base,device=cpu --tasks hellaswag,arc_easy
    python -m fasttrain.lm_eval ls tasks

Everything after the module name is lm-eval's (lm-eval 0.4.x: run, ls, validate, and the old form without a
subcommand). It is here because `lm_eval --model fasttrain` itself cannot work: lm-eval 0.4.13 finds models in
a fixed table of its own (lm_eval/models/__init__.py) and reads no plugin entry points, so a model from another
package exists for lm-eval only once that package has been imported, which this module does
(fasttrain/evaluation/harness.py registers `fasttrain`) before handing over to lm-eval's command line.
`fasttrain evaluate RUN --tasks ...` gives the same scores through fasttrain's own command line.
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
