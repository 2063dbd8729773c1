"""Shared fixtures: a prepared copy of the embedded corpus, shards with known contents, kernel backends."""

from __future__ import annotations

import copy
import gc
import importlib
import importlib.util
import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels are tested through Triton's interpreter, which triton.jit
# chooses when it decorates them: this must run before anything imports `kernels`. Without triton
# (the base install leaves it out; the test extra brings it) the kernel tests' Triton cases skip.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist starts one worker per core: each worker, and every process its tests start, gets one core's
# share of OpenMP threads. By default every process takes a thread per core, and on the 2-core CI machine
# 2 workers x 2 threads plus the processes they start spun waiting for each other: the first tier took
# 554 s of pytest, 460 s with one thread each. Plain `pytest` (one process) keeps every core.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _patch_the_language_once_a_launch() -> None:
    """Triton's interpreter (3.x) patches triton.language (`_patch_lang`: inspect.getmembers over tl, tl.tensor
    and tl.math, about 1 ms) at each launch, and again at every call of a @triton.jit function inside the kernel
    (its own helpers, and tl.sum or tl.max, which patch tl.core): thousands of times a test, though after the
    first patch of those modules in a launch another changes nothing (every builtin is replaced by then; the
    rest is set again to the same functions). Half the CPU time of an interpreted kernel test went there. Here a
    launch patches as shipped, and so does the first call inside it that needs a module the launch has not
    patched yet; later calls whose modules are patched already skip theirs. The launch's restore at its end is
    as it was (a call's patch was never restored). `tests/test_triton_interpreter.py` checks that kernels so run
    give bitwise the results they give under the interpreter as shipped."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None or not hasattr(interpreter, "_LangPatchScope"):
        return  # another Triton: its interpreter as it is
    launch_call = executor.__call__
    languages = (interpreter.tl, interpreter.tl.core)
    launches: list[frozenset] = []  # for each launch running: the language modules patched in it so far
    held: dict[tuple[int, int], frozenset] = {}  # by a function's globals: which of the languages they hold

    def modules(fn) -> frozenset:
        key = (id(fn.__globals__), len(fn.__globals__))
        if key not in held:
            held[key] = frozenset(id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages))
        return held[key]

    def patch_lang(fn):
        if not launches or not modules(fn) <= launches[-1]:
            scope = original(fn)
            if launches:
                launches[-1] |= modules(fn)
            return scope
        return interpreter._LangPatchScope()  # patched already in this launch: nothing set, nothing to restore

    def call(self, *args, **kwargs):
        launches.append(frozenset())
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_lang
    executor.__call__ = call
    interpreter.unpatched = (original, launch_call)  # for the test that compares the two


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _patch_the_language_once_a_launch()

import fasttrain_kernels._backend  # noqa: E402  (after the environment is set)
import fasttrain_kernels._multi_tensor  # noqa: E402
from fasttrain.compute.device import key_inductor_cache
from fasttrain.config import Config, load_config
from fasttrain.formats.shards import ShardWriter
from fasttrain.preparation.preparation import prepare

# Every test process compiles into its instruction set's own inductor cache, as a run does: a test calling
# torch.compile itself read kernels another process had compiled under other ISA caps from inductor's one default
# folder (NaN logits under ATEN_CPU_CAPABILITY=avx2 beside runs without it, a crash the other way round).
key_inductor_cache(torch.device("cpu"))


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--second-tier",
        action="store_true",
        help="run only the tests marked second_tier (slow checks CI runs after the README's command)",
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked second_tier run only with --second-tier, and then alone (the README's two commands)."""
    second = config.getoption("--second-tier")
    keep = [item for item in items if (item.get_closest_marker("second_tier") is not None) == second]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def pytest_collection_finish(session) -> None:
    """What collection imported (torch, the test modules, ...: some 390,000 objects) is set aside from the
    garbage collector's full passes, which would otherwise walk all of it each time: `fasttrain.train.main`
    collects on its way out (0.3 s of CPU in a pytest worker, at every run a test starts inside it), and Python
    makes a full pass by itself as objects accumulate. Nearly all of them live to the end of the session anyway
    (what of them becomes garbage is freed then); everything created after collection is collected as before."""
    gc.freeze()


def pytest_sessionfinish(session) -> None:
    """Handed back to the collector for the interpreter's exit, which frees only what it can see: Triton's
    bindings (nanobind) print pages of leaked objects otherwise."""
    gc.unfreeze()


@pytest.fixture(autouse=True)
def seeded(request) -> None:
    """Every test starts from random generators seeded by its own name: its inputs are still random,
    but a failure repeats on the next run (and in another order, or on another xdist worker)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory) -> Path:
    """The embedded corpus prepared with a small vocabulary (shared, treat as read-only)."""
    out = tmp_path_factory.mktemp("pydoc")
    prepare(["builtin:pydoc"], out, vocab_size=512, quiet=True)
    return out


@pytest.fixture(scope="session")
def code_data(pydoc_data, tmp_path_factory) -> Path:
    """The json package's sources, prepared with pydoc_data's tokenizer: a second source of one tokenizer."""
    out = tmp_path_factory.mktemp("code") / "code"
    prepare(
        [str(Path(json.__file__).parent / "*.py")], out, tokenizer_path=str(pydoc_data / "tokenizer.json"), quiet=True
    )
    return out


@pytest.fixture(scope="session")
def paragraph_data(tmp_path_factory) -> Path:
    """The embedded corpus's paragraphs as separate documents (mostly shorter than the tiny runs' 32-token
    rows, some longer), prepared like `pydoc_data`: data whose rows need padding (shared, read-only)."""
    from pydoc_data.topics import topics

    src = tmp_path_factory.mktemp("paragraphs")
    paragraphs = [" ".join(p.split()) for text in topics.values() for p in text.split("\n\n") if p.strip()]
    paragraphs = [p[: int(len(p) ** 0.7)] for p in paragraphs]  # cut long ones more: 10 to 700 characters
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    prepare([str(src / "docs.jsonl")], src / "data", vocab_size=512, quiet=True)
    return src / "data"


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int = 1 << 16) -> Path:
    with ShardWriter(path, vocab_size) as w:
        w.write(np.asarray(tokens))
    return path


@pytest.fixture
def counting_data(tmp_path) -> Path:
    """Two train shards whose tokens are their own positions (all distinct), and a val shard."""
    write_shard(tmp_path / "train_000000.bin", np.arange(0, 3000))
    write_shard(tmp_path / "train_000001.bin", np.arange(10_000, 12_500))
    write_shard(tmp_path / "val_000000.bin", np.arange(20_000, 21_000))
    return tmp_path


@pytest.fixture(scope="session")
def lm_eval_task_files() -> None:
    """lm-eval's own task YAML files parsed once a session, not at every index built of them.

    Each TaskManager (every `evaluate --tasks`, `eval.tasks` check, run of tasks) parses all ~14,000 YAML files
    that ship with lm-eval to index them: about 10 s of CPU each, some 16 times in the tests. Here its index
    builder keeps what it parsed of those files (they do not change during the tests) and hands each build a
    deep copy: the same index, built by the same code (on one machine, equal entry for entry to an index built
    without it). Task files written by the tests (--include-path) are parsed every time, as before."""
    if importlib.util.find_spec("lm_eval") is None:
        return
    try:
        index = importlib.import_module("lm_eval.tasks._index")
    except ImportError:
        return
    load = getattr(index, "load_yaml", None)
    if load is None or getattr(load, "shared", False):
        return  # another lm-eval, or shared already
    shipped = Path(index.__file__).resolve().parent
    parsed: dict[tuple, object] = {}

    def load_yaml(path, **options):
        key = (str(path), tuple(sorted(options.items())))
        if key not in parsed:  # only shipped files are kept, so only a miss resolves its path (~2.5 s an index)
            if not Path(path).resolve().is_relative_to(shipped):
                return load(path, **options)
            parsed[key] = load(path, **options)
        return copy.deepcopy(parsed[key])

    load_yaml.shared = True
    index.load_yaml = load_yaml


# How long a test waits on a subprocess before it calls it hung: a bound on hangs, not on speed. A start and a few
# steps of the tiny run take seconds on a quiet 2-core machine and took over 120 s at load 8 (issue 91), so the bound
# is 10 minutes; a test that measures speed is a benchmark, never a deadline here.
HANG_SECONDS = 600


# The tiny run widened to grouped-query attention (4 query heads, 2 key/value heads of 16): what the export tests
# train, so each layout's head mapping is checked where the two counts differ.
TINY_GQA = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2"]


def tiny_overrides(data_dir, out_dir) -> list[str]:
    """`--set` items for a 2-layer, 32-wide model on prepared data, small enough for many steps in a test."""
    meta = Path(data_dir) / "meta.json"
    inputs = json.loads(meta.read_text())["request"]["inputs"] if meta.is_file() else ["builtin:pydoc"]
    return [
        f'data.dir="{data_dir}"',
        f"data.inputs={json.dumps(inputs)}",
        f'train.out_dir="{out_dir}"',
        "train.device=cpu",
        "data.prefetch=0",
        "data.vocab_size=512",  # as the pydoc_data fixture was prepared
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.max_seq_len=32",
        # A model a Hugging Face Llama expresses without a fold, so any test may export it with --hf or start a run
        # from it (init_from): base.toml's embedding norm is tested where it is the point (test_model's options,
        # test_export's fold, the pinned main job and its exact resume).
        "model.embedding_norm=false",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.max_steps=10",
        "train.max_time=0",  # a run of steps, not of configs/base.toml's time budget
        "train.distill=false",  # an ensemble's final/ is the ensemble: base.toml's distillation is test_distilled_run's
        "checkpoint.fit_temperature=false",  # final/ holds the weights saved: base.toml's scale is test_calibration's
        'optim.name="adamw"',  # and AdamW with a cosine decay, not base.toml's Muon and warmdown
        'schedule.decay="cosine"',
        "schedule.warmup_steps=2",
        "train.sample_tokens=4",
        # final/ is not scored again on the whole val split at the end (seconds a run, over hundreds of runs): the
        # runs that test that closing score set "auto" or true (tests/test_final_score.py)
        "train.final_eval=false",
        "train.tensorboard=false",
        'train.precision="fp32"',  # "auto" would be bf16 on a CPU with native bf16: the same numbers everywhere
    ]


def tiny_config(data_dir, out_dir, *overrides: str) -> Config:
    """The tiny run as a Config, with `overrides` applied last."""
    return load_config(None, [*tiny_overrides(data_dir, out_dir), *overrides])


def tiny_args(data_dir, out_dir, *overrides: str, config: str = "configs/base.toml", flags=()) -> list[str]:
    """The tiny run as command-line arguments (train, doctor) on top of `config`, `flags` before `--set`."""
    return [config, *flags, "--set", *tiny_overrides(data_dir, out_dir), *overrides]


@pytest.fixture(params=["triton", "torch"])
def kernel_device(request, monkeypatch) -> torch.device:
    """Where a kernel test runs, once per implementation.

    triton: the Triton kernels, on the GPU if there is one, else on the CPU through the
    interpreter (skipped if TRITON_INTERPRET was not set at import), with blocks and tiles
    small enough that test-sized rows span several blocks and tiles end part-full.
    torch: the PyTorch implementation that CPU tensors use outside the interpreter.
    """
    if request.param == "torch":
        monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not fasttrain_kernels._backend.INTERPRETING:
        pytest.skip("no GPU, and the kernels were imported without TRITON_INTERPRET=1")
    # The package exports functions named like their modules, so fetch the modules themselves.
    monkeypatch.setattr(importlib.import_module("fasttrain_kernels.cross_entropy"), "MAX_BLOCK", 128)
    monkeypatch.setattr(
        importlib.import_module("fasttrain_kernels.rms_norm"), "TILE", 256
    )  # several short rows per tile
    monkeypatch.setattr(fasttrain_kernels._multi_tensor, "CHUNK", 64)  # tensors spread over several programs
    monkeypatch.setattr(fasttrain_kernels._multi_tensor, "BLOCK", 16)
    newton_schulz = importlib.import_module("fasttrain_kernels.newton_schulz")
    monkeypatch.setattr(newton_schulz, "BLOCK_M", 16)  # several tiles on each side of the diagonal
    monkeypatch.setattr(newton_schulz, "BLOCK_K", 16)
    return torch.device("cpu")


def spoil_after(trainer, after: int):
    """Make every update after step `after` end with all weights zero, so the model then predicts the uniform
    distribution (every logit 0, a validation loss of exactly ln(vocab)): worse by construction than any earlier
    evaluation of a model that has learnt anything, on any instruction set."""
    real_step = trainer.step

    def step():
        result = real_step()
        if trainer.run.step > after:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.zero_()
        return result

    trainer.step = step
    return trainer
