"""The `fasttrain` command: every tool under one name, as litgpt and torchtitan users expect.

Imports from fasttrain: system.errors.

    fasttrain train base --set train.max_steps=50       (a shipped config by name, or a file's path)
    fasttrain sample runs/base --prompt "The"
    fasttrain --help
    fasttrain --version

`fasttrain TOOL ARGS...` is exactly `python -m MODULE ARGS...` of the tool's module in TOOLS (same
parser, same errors and exit codes), and `python -m fasttrain TOOL ...` is the same again.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

from fasttrain import __version__
from fasttrain.system.errors import UsageError, invoked_as, run_cli

# tool -> (module, what it does): the order `fasttrain --help` lists them in, the order of a workflow
TOOLS = {
    "prepare": ("fasttrain.prepare", "tokenize text into shards (a prepared folder)"),
    "configs": ("fasttrain.configs", "list the shipped configs (fasttrain train NAME runs one)"),
    "init": ("fasttrain.init", "write a copy of a shipped config to edit"),
    "train": ("fasttrain.train", "train a model from a TOML config or a shipped config's name"),
    "sample": ("fasttrain.sample", "generate text from a run, its weights or a checkpoint"),
    "evaluate": ("fasttrain.evaluate", "score a trained model: loss, perplexity, bits per byte"),
    "export": ("fasttrain.export", "write safetensors, in fasttrain's or Hugging Face's Llama layout"),
    "doctor": ("fasttrain.doctor", "check one real batch for why a loss would not fall"),
    "plot": ("fasttrain.plot", "draw a run's loss and learning-rate curves"),
}


def usage(command: str = "fasttrain") -> str:
    lines = [
        f"usage: {command} TOOL [ARGS...]   ({command} TOOL --help for its arguments; {command} --version)",
        "",
        "tools:",
    ]
    lines += [f"  {name:<9} {what}" for name, (_, what) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, command: str = "fasttrain") -> int:
    """Run the tool named by argv[0] on the rest of argv, as `command TOOL` (its --help and errors say so);
    0 after --help or with no tool at all shows usage, after --version the version."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(command))
        return 0
    if argv[0] == "--version":
        print(f"fasttrain {__version__}")
        return 0
    tool, rest = argv[0], argv[1:]
    if tool not in TOOLS:
        close = difflib.get_close_matches(tool, TOOLS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"{command}: unknown tool {tool!r}; {hint}one of {', '.join(TOOLS)} (see {command} --help)")
    with invoked_as(f"{command} {tool}"):
        return importlib.import_module(TOOLS[tool][0]).main(rest)


def entry_point(command: str = "fasttrain") -> None:
    """The console script ([project.scripts] in pyproject.toml); `command`: what the user typed to run it."""
    run_cli(lambda argv: main(argv, command))
