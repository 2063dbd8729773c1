"""How far a run's config travels before the run starts: every call of a fasttrain function that is handed the
Config, from `start_run` (training/launch.py) to the plan it returns, counted by module and floor.

    python -m benchmarks.studies.config_walk DATA_DIR [--config configs/base.toml] [--set KEY=VALUE ...]

It plans a run of the config on the prepared folder DATA_DIR (its tokenizer and vocabulary, the CPU; a time budget
times the machine, as the run would) under sys.setprofile and prints, in call order, each stop (a call whose
arguments hold the Config: its sections, handed on alone, are where a decision reads its part), then four counts:
  stops    the calls handed the Config
  places   the modules they are in
  climbs   stops on a higher floor than the stop before (tests/test_layout.py's FLOORS; fasttrain/*.py on top):
           the config handed back up to a layer it had gone down from
  returns  stops in a module left before (not the one just before): a reader following the config comes back
Run it at two commits (the script alone, copied in) to compare their walks; the floors are named by folder, so a
module that moved counts on its new floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FLOORS = ("system", "config", "compute", "formats", "preparation", "data", "model", "checkpoints", "evaluation",
          "optimization", "planning", "training")  # fmt: skip


def floor(module: str) -> int:
    """The floor of fasttrain module `module` (dotted): its folder's place in FLOORS, the commands above them."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 2 and parts[1] in FLOORS else len(FLOORS)


def walk(data_dir: str, config: str, sets: list[str]) -> list[str]:
    """The modules of the stops, in call order, of start_run's plan of `config` with `sets` on `data_dir`."""
    from fasttrain.config import Config, load_config
    from fasttrain.training.launch import start_run

    root = str(Path(__import__("fasttrain").__file__).parent)
    place = [f'data.dir="{data_dir}"', "data.inputs=[]", "data.vocab_size=0", "train.device=cpu"]
    cfg = load_config(config, [*place, *sets])
    stops: list[str] = []

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(root):
            return
        arguments = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(isinstance(frame.f_locals.get(name), Config) for name in arguments):
            stops.append(f"{frame.f_globals.get('__name__')}.{code.co_name}")

    sys.setprofile(profile)
    try:
        start_run(cfg, quiet=True)
    finally:
        sys.setprofile(None)
    return stops


def counts(stops: list[str]) -> dict[str, int]:
    """stops, places, climbs and returns (the module docstring) of a walk."""
    modules = [s.rsplit(".", 1)[0] for s in stops]
    climbs = sum(floor(b) > floor(a) for a, b in zip(modules, modules[1:]))
    returns = sum(b != a and b in modules[:i] for i, (a, b) in enumerate(zip(modules, modules[1:]), start=1))
    return {"stops": len(stops), "places": len(set(modules)), "climbs": climbs, "returns": returns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--config", default="configs/base.toml")
    parser.add_argument("--set", nargs="*", default=[], dest="sets")
    args = parser.parse_args()
    stops = walk(args.data_dir, args.config, args.sets)
    for stop in stops:
        print(stop)
    print(" ".join(f"{k} {v}" for k, v in counts(stops).items()))


if __name__ == "__main__":
    main()
