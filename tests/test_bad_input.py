"""Bad input across config, data, checkpoints and the command lines: one line, exit status 2, nothing damaged.

Every case runs a real entry point (`main` of train, doctor, export, plot, sample, evaluate) through
`run_cli`, the same wrapper `python -m` uses, against a run directory saved once
for the module. After each case that run directory must be byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fasttrain import cli, doctor, evaluate, export, plot, prepare, sample, train
from fasttrain.checkpoints import checksums
from fasttrain.checkpoints.run_directory import MEMBERS_DIR, SET_ASIDE, write_journal
from fasttrain.system.errors import run_cli
from tests.conftest import tiny_args
from tests.test_lm_eval import faulty_task, with_lm_eval, wordlevel_run, wordlevel_training
from tests.test_reliability_round5_checkpoints import flip_a_bit
from tests.test_reliability_start import another_tokenizer, edit_config, edit_tensor, index_outside, init_from, nan

pytestmark = pytest.mark.usefixtures("lm_eval_task_files")  # the rows of --tasks and eval.tasks (conftest)


class Case:
    """Files and arguments for one bad input: `data` is the prepared corpus, `run` the saved run."""

    def __init__(self, data: Path, run: Path, tmp: Path):
        self.data, self.run, self.tmp = data, run, tmp

    def train(self, *sets: str, config: str = "configs/base.toml", out: Path | None = None, flags=()) -> list[str]:
        """Arguments of a tiny CPU run on the prepared corpus into `out` (default: a new directory)."""
        return tiny_args(
            self.data,
            out or self.tmp / "out",
            "train.max_steps=2",
            "schedule.warmup_steps=1",
            "train.sample_tokens=0",
            *sets,
            config=config,
            flags=flags,
        )

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def data_copy(self, damage) -> str:
        """A copy of the prepared corpus, damaged by `damage(directory)`."""
        copy = self.tmp / "data"
        shutil.copytree(self.data, copy)
        damage(copy)
        return str(copy)

    def run_copy(self) -> Path:
        copy = self.tmp / "run"
        shutil.copytree(self.run, copy)
        return copy

    def checkpoint(self) -> Path:
        return self.run / "checkpoints" / "step_0000002.pt"


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def distilled(c: Case, members_trained: bool) -> Path:
    """A distilled run's directory (training/phases.py) before its student's first save: its members training in
    RUN/ensemble (a save of theirs), or trained (their final/ too). Issue 101 item 7: the tools said "no checkpoint
    saved there yet" without naming RUN/ensemble."""
    run = c.tmp / "distilled"
    members = run / MEMBERS_DIR
    shutil.copytree(c.run / "checkpoints", members / "checkpoints")
    if members_trained:
        shutil.copytree(c.run / "final", members / "final")
    return run


def unpickling_runs_code(c: Case) -> str:
    """A checkpoint whose unpickling would create a file, if it were ever allowed to run code."""

    class Payload:
        def __reduce__(self):
            return Path.touch, (c.tmp / "pwned",)

    torch.save({"model": Payload(), "optimizer": {}, "step": 1, "config": ""}, c.tmp / "evil.pt")
    return str(c.tmp / "evil.pt")


def overwrite_killed(c: Case) -> Path:
    """A copy of the run as `kill -9` of an --overwrite start there leaves it before the new run's first save: the
    earlier run's files in .replaced-by-overwrite/, the new run's config and metrics beside it."""
    run = c.run_copy()
    (run / ".replaced-by-overwrite").mkdir()
    names = ["checkpoints", "final", "metrics.jsonl", "config.toml"]
    for name in names:
        (run / name).rename(run / ".replaced-by-overwrite" / name)
    write_journal(run, SET_ASIDE, names)  # the record the start left: every name moved
    shutil.copy(run / ".replaced-by-overwrite" / "config.toml", run / "config.toml")
    (run / "metrics.jsonl").write_text("")
    return run


def sharded_run(c: Case, damage) -> Path:
    """The latest save of a run in sharded checkpoints (a world of one), damaged by `damage(folder)`."""
    run = c.tmp / "sharded"
    with pytest.raises(SystemExit):
        run_cli(train.main, c.train('checkpoint.format="sharded"', out=run))
    damage(run / "checkpoints" / "step_0000002")
    return run / "checkpoints" / "step_0000002"


def beyond_llama_run(c: Case) -> Path:
    """A run whose model a Hugging Face Llama cannot express: a ReLU² MLP and QK-norm (its normalised embedding
    folds into the table)."""
    run = c.tmp / "relu2"
    with pytest.raises(SystemExit):
        run_cli(train.main, c.train("model.mlp=relu2", "model.qk_norm=true", "model.embedding_norm=true", out=run))
    return run


def flipped_copy(c: Case) -> str:
    """A copy of the run's last checkpoint file with one bit flipped in its tensors' bytes."""
    copy = Path(c.file("flipped.pt", c.checkpoint().read_bytes()))
    flip_a_bit(copy)
    return str(copy)


def planted_checksum(folder: Path, name: str) -> None:
    """A sharded checkpoint whose state.pt records a checksum for `name` (a FIFO's would hang a read)."""
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save({**state, "checksums": {**state["checksums"], name: 0}}, folder / "state.pt")


def evil_metadata(c: Case, folder: Path) -> None:
    """A sharded checkpoint's .metadata (a pickle, which DCP's own reader loads with pickle.load) that would
    create a file when unpickled."""

    class Payload:
        def __reduce__(self):
            return Path.touch, (c.tmp / "pwned",)

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    rerecord(folder, ".metadata")  # as an attacker would: the unpickler, not the checksum, must refuse it


def rerecord(folder: Path, name: str) -> None:
    """state.pt of the sharded save `folder` records `name`'s CRC-32 as the file is now."""
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save(
        {**state, "checksums": {**state["checksums"], name: checksums.crc32(folder / name)}}, folder / "state.pt"
    )


def non_utf8_member(c: Case) -> str:
    """A copy of the run's last checkpoint file whose zip index names a member in bytes that are not UTF-8 (one
    flipped bit in the central directory; torch.save marks its names UTF-8)."""
    data = bytearray(c.checkpoint().read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last member's entry in the central directory
    name_at = central + 46  # its file name follows the 46-byte fixed part
    data[name_at] |= 0x80  # an ASCII letter becomes a byte no UTF-8 sequence starts with alone
    return c.file("non-utf8.pt", bytes(data))


def swapped_saves(checkpoints: Path) -> None:
    """Two saves of the run swapped by name: step_0000002.pt holds step 1 and step_0000001.pt step 2."""
    first, second = checkpoints / "step_0000001.pt", checkpoints / "step_0000002.pt"
    first.rename(checkpoints / "swap")
    second.rename(first)
    (checkpoints / "swap").rename(second)


def sharded_pair(c: Case) -> Path:
    """A run saved sharded at steps 1 and 2, whose step-2 folder holds step 1's state.pt."""
    run = c.tmp / "sharded-pair"
    with pytest.raises(SystemExit):
        run_cli(train.main, c.train('checkpoint.format="sharded"', "checkpoint.interval=1", out=run))
    saves = run / "checkpoints"
    (saves / "step_0000001" / "state.pt").replace(saves / "step_0000002" / "state.pt")
    return saves / "step_0000002"


def lying_shard(d: Path) -> None:
    """Token id 1000 from position 100 on in a train shard of the 512-token vocabulary; its header still says 512."""
    shard = d / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    start = 1024 + 2 * 100  # past the header, 100 uint16 tokens in
    data[start:] = (1000).to_bytes(2, "little") * ((len(data) - start) // 2)
    shard.write_bytes(data)


def parquet(c: Case, damaged: bool = False, **columns: list) -> str:
    """docs.parquet holding `columns`, or (`damaged`) plain text; the case is skipped without pyarrow."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    if damaged:
        return c.file("docs.parquet", "plain text")
    pq.write_table(pa.table(columns), c.tmp / "docs.parquet")
    return str(c.tmp / "docs.parquet")


def damaged_parquet(c: Case) -> str:
    """A Parquet file whose footer is whole but whose column chunk has 200 flipped bytes (skipped without pyarrow)."""
    path = Path(parquet(c, text=[f"document number {i} " * 20 for i in range(3000)]))
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 200):
        data[i] ^= 0x5A
    path.write_bytes(data)
    return str(path)


def edit_meta(**changes):
    """A damage for `Case.data_copy`: meta.json with `changes` applied."""

    def damage(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({**meta, **changes}))

    return damage


def mix(c: Case, *tables: str) -> list[str]:
    """--set items of a mixture of the TOML inline `tables` instead of the prepared corpus (data.dir)."""
    return ['data.dir=""', "data.inputs=[]", f"data.sources=[{', '.join(tables)}]"]


def other_data(c: Case, vocab_size: int) -> str:
    """A folder prepared with a tokenizer of its own (of `vocab_size`), from text unlike the corpus's."""
    out = c.tmp / f"other{vocab_size}"
    prepare.main(
        [
            "--input",
            c.file("o.txt", "\n".join(str(i * i) for i in range(5000))),
            "--out",
            str(out),
            "--vocab-size",
            str(vocab_size),
        ]
    )
    return str(out)


def fifo(path: Path) -> str:
    """A named pipe at `path` (nothing ever writes to it: opening it for reading would block forever)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return str(path)


def damaged(c: Case, damage) -> Path:
    """A copy of the saved run after `damage(its checkpoints/ path)`."""
    run = c.run_copy()
    damage(run / "checkpoints")
    return run


def hf_export(c: Case) -> str:
    """The saved run's weights exported in Hugging Face's layout, into a copy of the run: its export-hf/."""
    run = c.run_copy()
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
        run_cli(export.main, [str(run), "--hf"])
    assert done.value.code == 0
    return str(run / "export-hf")


def weights_copy(c: Case, damage) -> str:
    """A copy of the saved run's final/, damaged by `damage(that folder)`."""
    copy = c.tmp / "weights"
    shutil.copytree(c.run / "final", copy)
    damage(copy)
    return str(copy)


def resume_damaged(damage):
    return lambda c: c.train(out=damaged(c, damage), flags=["--resume", "auto"])


def latest_a_directory(checkpoints: Path) -> None:
    (checkpoints / "latest").unlink()
    (checkpoints / "latest").mkdir()


def checkpoints_a_file(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints)
    checkpoints.write_text("not a directory")


def unfinished(damage):
    """`damage`, to a run that never finished: without final/ weights, tools read its checkpoints."""

    def damage_unfinished(checkpoints: Path) -> None:
        shutil.rmtree(checkpoints.parent / "final")
        damage(checkpoints)

    return damage_unfinished


def binary_latest(checkpoints: Path) -> None:
    (checkpoints / "latest").write_bytes(b"\xff\xfe\x00\x01\x9c")


# A Hugging Face Llama's config.json, as small as the tiny run's model
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 512,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-5,
}


def weights_with_list_header(c: Case) -> str:
    """A copy of the run's final/ weights whose model.safetensors header is a JSON list, not an object."""
    copy = c.tmp / "weights"
    shutil.copytree(c.run / "final", copy)
    head = b"[]" + b" " * 6
    (copy / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head)
    return str(copy)


def chain_of_configs(c: Case, n: int) -> str:
    """c0.toml extends c1.toml ... up to c<n>.toml, which extends configs/base.toml."""
    for i in range(n):
        c.file(f"c{i}.toml", f'extends = "c{i + 1}.toml"\n')
    c.file(f"c{n}.toml", f'extends = "{Path("configs/base.toml").resolve()}"\n')
    return str(c.tmp / "c0.toml")


CASES = [
    # config files
    (
        "negative train.max_time",
        train,
        lambda c: c.train("train.max_time=-5"),
        "--set: train.max_time: must be >= 0 and at most a year (31,622,400 s), got -5.0",
    ),
    (
        "a budget no plan can count in steps",
        train,
        lambda c: c.train("train.max_time=1e308"),
        "--set: train.max_time: must be >= 0 and at most a year (31,622,400 s), got 1e+308",
    ),
    (
        "a duration beyond a float",
        train,
        lambda c: c.train(f'train.max_time="{"9" * 400}s"'),
        "--set: train.max_time: expected seconds or a duration",
    ),
    (
        "an integer beyond a float for a rate",
        train,
        lambda c: c.train("optim.lr=1" + "0" * 400),
        "--set: optim.lr: expected a finite number, got 1000",
    ),
    (
        "a path holding a NUL",
        train,
        lambda c: c.train('model.init_from="i\\u0000x"'),
        "--set: model.init_from: expected a string of UTF-8 text without NUL",
    ),
    (
        "a path that is not UTF-8 (an undecodable byte)",
        train,
        lambda c: c.train(f"train.out_dir={c.tmp}/r\udcff"),
        "train.out_dir: expected a string of UTF-8 text without NUL",
    ),
    (
        "NaN train.max_time",
        train,
        lambda c: c.train("train.max_time=nan"),
        'train.max_time: expected seconds or a duration such as "90s", "3m" or "1h30m", got nan (float)',
    ),
    (
        "unparsable train.max_time",
        train,
        lambda c: c.train('train.max_time="3 minutes"'),
        'train.max_time: expected seconds or a duration such as "90s", "3m" or "1h30m", got "3 minutes" (str)',
    ),
    (
        "train.max_time 0 and no step limit",
        train,
        lambda c: c.train("train.max_steps=0", "train.max_time=0"),
        "train.max_steps = 0 and train.max_time = 0.0 (0 is no limit, and a run needs one",
    ),
    (
        "resume a run with a train.max_time shorter than it trained",
        train,
        lambda c: c.train("train.max_time=0.000001", out=c.run, flags=["--resume", "auto"]),
        "past train.max_time = 1e-06s: nothing to train; set train.max_time to more than",
    ),
    (
        "schedule.progress_from a step run's metrics",
        train,
        lambda c: c.train("schedule.progress_from=" + str(c.run)),
        "records no progress: it is not the metrics.jsonl of a run",
    ),
    (
        "schedule.progress_from a missing file",
        train,
        lambda c: c.train("schedule.progress_from=" + str(c.tmp / "nothing.jsonl")),
        "nothing.jsonl (No such file or directory)",
    ),
    (
        "schedule.progress_from with a clock",
        train,
        lambda c: c.train("schedule.progress_from=" + str(c.run), "train.max_time=60"),
        "does not go with train.max_time = 60.0 (a replay follows the recorded progress, not a clock",
    ),
    (
        "config is /dev/zero",
        train,
        lambda c: c.train(config="/dev/zero"),
        "/dev/zero: cannot read (not a regular file)",
    ),
    (
        "base config is a FIFO",
        train,
        lambda c: c.train(config=c.file("c.toml", f'extends = "{fifo(c.tmp / "pipe")}"')),
        "pipe: cannot read (not a regular",
    ),
    (
        "extends chain of 1,100 files",
        train,
        lambda c: c.train(config=chain_of_configs(c, 1100)),
        "a chain of more than 32 config files",
    ),
    ("negative seed", train, lambda c: c.train("train.seed=-1"), "train.seed: must be in [0, 4294967295], got -1"),
    (
        "seed beyond 32 bits",
        train,
        lambda c: c.train("train.seed=99999999999"),
        "train.seed: must be in [0, 4294967295]",
    ),
    ("prefetch without bound", train, lambda c: c.train("data.prefetch=1000000"), "data.prefetch: must be in [0, 64]"),
    (
        "SwiGLU wider than memory",
        train,
        lambda c: c.train("model.ffn_hidden=1000000000"),
        "reduce model.n_layers = 2, model.d_model = 32, model.ffn_hidden = 1000000000, model.vocab_size",
    ),
    (
        "multiple_of wider than memory",
        train,
        lambda c: c.train("model.multiple_of=1000000000"),
        "model.d_model = 32, model.multiple_of = 1000000000, model.vocab_size",
    ),
    # A folder of another kind as train.out_dir: the run wrote its tokenizer.json over the data's, its config.toml over
    # the weights' and its files among the saves (with --overwrite the data's tokenizer was set aside, then deleted)
    (
        "train.out_dir: a prepared data folder",
        train,
        lambda c: c.train(out=Path(c.data_copy(lambda d: None)), flags=["--overwrite"]),
        "/data: a prepared data folder (a run there would write its tokenizer.json over the data's)",
    ),
    (
        "train.out_dir: a file",
        train,
        lambda c: c.train(out=Path(c.file("notes.txt", "x"))),
        "notes.txt is a file, not a",
    ),
    (
        "train.out_dir: under a file",
        train,
        lambda c: c.train(out=Path(c.file("n.txt", "x")) / "run"),
        "n.txt is a file",
    ),
    ("train.out_dir: a run's final/", train, lambda c: c.train(out=c.run / "final"), "final: a model's weights"),
    (
        "resume: a file where final/ should be",  # found after every step was trained
        train,
        resume_damaged(lambda saves: (shutil.rmtree(saves.parent / "final"), (saves.parent / "final").write_text("x"))),
        "final: is not a directory, so no final weights can be saved there",
    ),
    ("train.out_dir: a run's checkpoints/", train, lambda c: c.train(out=c.run / "checkpoints"), "checkpoints/ folder"),
    (
        "resume: data.dir moved away",  # the default corpus was prepared there, then found to differ
        train,
        lambda c: c.train(f'data.dir="{c.tmp / "moved"}"', out=c.run_copy(), flags=["--resume", "auto"]),
        "moved: not there; the run resumes on the data it trained on",
    ),
    ("malformed TOML", train, lambda c: c.train(config=c.file("bad.toml", "[train\nmax_steps = 3")), "invalid TOML"),
    ("config not UTF-8", train, lambda c: c.train(config=c.file("bad.toml", b"\xff\xfe[train]")), "not UTF-8"),
    ("missing config", train, lambda c: c.train(config=str(c.tmp / "nope.toml")), "nope.toml: no such file"),
    ("config is a directory", train, lambda c: c.train(config=str(c.tmp)), "cannot read"),
    (
        "unknown section",
        train,
        lambda c: c.train(config=c.file("c.toml", "[trian]\nmax_steps = 3")),
        "unknown section [trian]; did you mean [train]?",
    ),
    (
        "a key in another section",
        train,
        lambda c: c.train("train.lr=0.01"),
        "unknown key train.lr; it is a key of [optim]: optim.lr",
    ),
    (
        "config with a byte-order mark",
        train,
        lambda c: c.train(config=c.file("bom.toml", "\ufeff[optim]\nlr = -1\n")),  # read as TOML: its values checked
        "optim.lr: must be > 0",
    ),
    ("unknown key", train, lambda c: c.train("train.max_step=3"), "unknown key train.max_step; did you mean"),
    (
        "section not a table",
        train,
        lambda c: c.train(config=c.file("c.toml", "train = 3")),
        "train: expected a [section] table, got 3",
    ),
    ("string for an integer", train, lambda c: c.train('train.batch_size="8"'), 'expected an integer, got "8"'),
    ("bool for an integer", train, lambda c: c.train("model.n_layers=true"), "expected an integer, got true"),
    (
        "an integer beyond 64 bits",
        train,
        lambda c: c.train("model.max_seq_len=99999999999999999999"),
        "expected an integer, got 99999999999999999999",
    ),
    ("zero batch size", train, lambda c: c.train("train.batch_size=0"), "train.batch_size: must be > 0, got 0"),
    ("negative learning rate", train, lambda c: c.train("optim.lr=-0.001"), "optim.lr: must be > 0"),
    ("nan learning rate", train, lambda c: c.train("optim.lr=nan"), "expected a finite number, got nan"),
    (
        "unknown optimizer",
        train,
        lambda c: c.train("optim.name=lion"),
        'optim.name: expected one of "adamw", "muon", "sgd", "adafactor", got "lion"',
    ),
    (
        "another optimizer's key",
        train,
        lambda c: c.train("optim.sgd.momentum=0.5"),
        'optim.sgd.momentum: applies only with optim.name = "sgd", not "adamw"',
    ),
    (
        "AdamW's key with SGD",
        train,
        lambda c: c.train("optim.name=sgd", "optim.beta2=0.99"),
        'optim.beta2: applies only with optim.name = "adamw" or "muon", not "sgd"',
    ),
    (
        "optimizer table not a table",
        train,
        lambda c: c.train(config=c.file("c.toml", "[optim]\nmuon = 3")),
        "optim.muon: expected a [optim.muon] table, got 3",
    ),
    (
        "step decay key with cosine",
        train,
        lambda c: c.train("schedule.step_factor=0.3"),
        'schedule.step_factor: applies only with schedule.decay = "step", not "cosine"',
    ),
    (
        "the warmdown's length with cosine",
        train,
        lambda c: c.train("schedule.cooldown_fraction=0.3"),
        'schedule.cooldown_fraction: applies only with schedule.decay = "wsd", not "cosine"',
    ),
    (
        "negative max steps",
        train,
        lambda c: c.train("train.max_steps=-5"),
        "train.max_steps: must be >= 0 (0: no step limit",
    ),
    (
        "seq_len beyond the context",
        train,
        lambda c: c.train("train.seq_len=64", "model.max_seq_len=32"),
        "train.seq_len = 64 exceeds model.max_seq_len = 32",
    ),
    (
        "heads do not divide d_model",
        train,
        lambda c: c.train("model.d_model=30", "model.n_heads=4"),
        "model.d_model = 30 is not divisible by model.n_heads = 4",
    ),
    ("unknown precision", train, lambda c: c.train("train.precision=fp8"), 'expected one of "auto", "fp32"'),
    (
        "unknown compile mode",
        train,
        lambda c: c.train('train.compile_mode="fast"'),
        'train.compile_mode: expected one of "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", '
        'got "fast"',
    ),
    (
        "a GPU attention kernel on the CPU",
        train,
        lambda c: c.train('train.attention="flash"'),
        'train.attention = "flash" needs a CUDA GPU (on a cpu: "auto" or "math")',
    ),
    (
        "FlashAttention-3 on the CPU",
        train,
        lambda c: c.train('train.attention="fa3"'),
        'train.attention = "fa3" needs a CUDA GPU',
    ),
    (
        "an FP8 head with the fused loss forced on",
        train,
        lambda c: c.train('train.fp8="head"', "kernels.linear_cross_entropy=true"),
        'kernels.linear_cross_entropy = true does not work with train.fp8 = "head"',
    ),
    (
        "unknown attention kernel",
        train,
        lambda c: c.train('train.attention="fa2"'),
        'train.attention: expected one of "auto", "flash", "cudnn", "efficient", "math", "fa3", "flex", got "fa2"',
    ),
    (
        "CUDA graphs on varying shapes",
        train,
        lambda c: c.train('train.compile_mode="reduce-overhead"', 'data.batching="padded"', 'data.padding="longest"'),
        'train.compile_mode = "reduce-overhead" does not work with data.padding = "longest"',
    ),
    (
        "unknown activation checkpointing",
        train,
        lambda c: c.train("train.activation_checkpointing=true"),
        'train.activation_checkpointing: expected one of "none", "full", "selective", got true',
    ),
    ("unknown device", train, lambda c: c.train("train.device=tpu"), "must be auto, cpu, cuda or cuda:N"),
    ("rollback factor above 1", train, lambda c: c.train("recovery.lr_factor=1.5"), "must be in (0, 1)"),
    ("fp16 without CUDA", train, lambda c: c.train("train.precision=fp16"), 'train.precision = "fp16" needs a CUDA'),
    (
        "model vocab below the tokenizer's",
        train,
        lambda c: c.train("model.vocab_size=300"),
        "model.vocab_size = 300 is smaller than the 512 tokens of",
    ),
    ("model wider than memory", train, lambda c: c.train("model.d_model=100000000"), "the run needs about"),
    (
        "a hundred million layers",
        train,
        lambda c: c.train("model.n_layers=100000000"),
        "GiB available; reduce model.n_layers = 100000000",
    ),
    (
        "context longer than memory",
        train,
        lambda c: c.train("model.max_seq_len=1000000000000000"),
        "model.max_seq_len = 1000000000000000",
    ),
    (
        "prepare: absurd vocabulary",
        prepare,
        lambda c: ["--input", "builtin:pydoc", "--out", str(c.tmp / "p"), "--vocab-size", "100000000000"],
        "vocab size 100000000000 is too large: at most 1048576",
    ),
    # command lines
    (
        "--seed out of range names --seed",
        train,
        lambda c: c.train(flags=["--seed", "-1"]),
        "--seed: train.seed: must be in [0, 4294967295], got -1",
    ),
    (
        "--device unknown names --device",
        train,
        lambda c: c.train(flags=["--device", "gpu"]),
        '--device: train.device: must be auto, cpu, cuda or cuda:N, got "gpu"',
    ),
    (
        "two config paths, one swallowed by --set",
        train,
        lambda c: ["--set", "train.max_steps=2", "configs/base.toml", "--quiet", "configs/gpt2-small.toml"],
        "two config files: configs/base.toml and configs/gpt2-small.toml",
    ),
    (
        "resume a finished run with a smaller train.max_steps",
        train,
        lambda c: c.train("train.max_steps=1", out=c.run, flags=["--resume", "auto"]),
        "step_0000002.pt: the run is at step 2, past train.max_steps = 1: nothing to train",
    ),
    ("misspelt flag", train, lambda c: c.train(flags=["--resum", "auto"]), "unrecognized arguments: --resum"),
    (
        "resume and overwrite at once",
        train,
        lambda c: c.train(flags=["--resume", "auto", "--overwrite"]),
        "argument --overwrite: not allowed with argument --resume",
    ),
    ("--set without =", train, lambda c: c.train("train.max_steps"), "expected SECTION.KEY=VALUE"),
    (
        "--measure 0",
        train,
        lambda c: c.train(flags=["--dry-run", "--measure", "0"]),
        "argument --measure: expected an integer > 0, got 0",
    ),
    (
        "--measure negative",
        train,
        lambda c: c.train(flags=["--dry-run", "--measure=-1"]),
        "argument --measure: expected an integer > 0, got -1",
    ),
    (
        "--measure not a number",
        train,
        lambda c: c.train(flags=["--dry-run", "--measure", "abc"]),
        "argument --measure: expected an integer > 0, got 'abc'",
    ),
    ("--json without --dry-run", train, lambda c: c.train(flags=["--json"]), "--json: only with --dry-run"),
    ("no config given", train, lambda c: [], "the following arguments are required: config"),
    (
        "doctor: steps not a number",
        doctor,
        lambda c: ["configs/base.toml", "--overfit-steps", "many"],
        "expected an integer > 0, got 'many'",
    ),
    ("doctor: zero steps", doctor, lambda c: ["configs/base.toml", "--overfit-steps", "0"], "expected an integer > 0"),
    (
        "export --hf: a tokenizer with more tokens than the model",  # written beside a config.json of fewer
        export,
        lambda c: [weights_copy(c, another_tokenizer), "--hf"],
        "model.vocab_size = 512 is smaller than the 513 tokens",
    ),
    (
        "export: a damaged tokenizer",  # copied as it was
        export,
        lambda c: [weights_copy(c, lambda d: (d / "tokenizer.json").write_text("{"))],
        "tokenizer.json: not a valid tokenizer.json",
    ),
    (
        "resume: the run's own tokenizer.json damaged",  # blamed on the data, prepared again
        train,
        resume_damaged(lambda saves: (saves.parent / "tokenizer.json").write_text("{")),
        "tokenizer.json: damaged (not JSON), the run's copy of its tokenizer",
    ),
    (
        "sample: final/ without its weights",  # the latest checkpoint was taken, which need not be final/'s ("best")
        sample,
        lambda c: [str(damaged(c, lambda saves: (saves.parent / "final" / "model.safetensors").unlink()))],
        "final: holds no model.safetensors (removed, or its write cut short)",
    ),
    ("sample: a prepared data folder", sample, lambda c: [str(c.data)], "a prepared data folder, not a run"),
    (
        "sample: a Hugging Face export",  # it read "export-hf/config.toml: no such file"
        sample,
        lambda c: [hf_export(c)],
        "export-hf: a Hugging Face export (config.json), not fasttrain's weights",
    ),
    ("export: unknown dtype", export, lambda c: [str(c.run), "--dtype", "fp8"], "invalid choice: 'fp8'"),
    ("plot: not a run directory", plot, lambda c: [str(c.tmp)], "metrics.jsonl: no such file"),
    (
        "plot: a format matplotlib has none of",
        plot,
        lambda c: [str(c.run), "--out", str(c.tmp / "x.txt")],
        "x.txt: cannot write",
    ),
    (
        "plot: an evaluation without its loss",
        plot,
        lambda c: [str(Path(c.file("odd/metrics.jsonl", '{"event": "eval", "step": 3}\n')).parent)],
        'metrics.jsonl: the eval event {"event": "eval", "step": 3} lacks a number for one of step, val_loss',
    ),
    (
        "plot: a mixture's change of weights without its step",  # a traceback (KeyError) at the dotted line
        plot,
        lambda c: [
            str(
                Path(
                    c.file(
                        "odd/metrics.jsonl",
                        '{"event": "eval", "step": 3, "val_loss": 2.0}\n{"event": "mix", "weights": [1.0]}\n',
                    )
                ).parent
            )
        ],
        'metrics.jsonl: the mix event {"event": "mix", "weights": [1.0]} lacks a number for one of step',
    ),
    (
        "plot: a line that is a JSON list",
        plot,
        lambda c: [str(Path(c.file("odd/metrics.jsonl", '[1, 2]\n{"event": "eval", "step": 3}\n')).parent)],
        "metrics.jsonl:1: not a JSON object",
    ),
    # data
    (
        "meta.json without tokens, with --overwrite",
        train,
        lambda c: c.train(
            "data.dir="
            + c.data_copy(
                lambda d: (d / "meta.json").write_text(
                    json.dumps({k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "tokens"})
                )
            ),
            out=c.run,
            flags=["--overwrite"],
        ),
        "meta.json: tokens.train = (missing), expected a count >= 0; prepare the data again",
    ),
    (
        "meta.json request.val_fraction not a number",
        train,
        lambda c: c.train(
            "data.dir="
            + c.data_copy(
                edit_meta(request={**json.loads((c.data / "meta.json").read_text())["request"], "val_fraction": "abc"})
            )
        ),
        'meta.json: request.val_fraction = "abc", expected a number in [0, 1)',
    ),
    (
        "meta.json counts 1 val byte for thousands of tokens",
        train,
        lambda c: c.train(
            "data.dir="
            + c.data_copy(
                edit_meta(text_bytes={**json.loads((c.data / "meta.json").read_text())["text_bytes"], "val": 1})
            )
        ),
        "meta.json: text_bytes.val = 1, too few for the",
    ),
    (
        "a shard of another vocabulary copied in",
        train,
        lambda c: c.train(
            "data.dir="
            + c.data_copy(
                lambda d: (d / "val_000000.bin").write_bytes(
                    (b := (d / "val_000000.bin").read_bytes())[:16] + (300).to_bytes(4, "little") + b[20:]
                )
            )
        ),
        "val_000000.bin: a shard of another preparation (its header says vocabulary 300",
    ),
    (
        "a shard copied over another",
        train,
        lambda c: c.train(
            "data.dir=" + c.data_copy(lambda d: shutil.copy(d / "val_000000.bin", d / "train_000000.bin"))
        ),
        "its train shards hold",
    ),
    (
        "a shard meta.json does not list",
        train,
        lambda c: c.train(
            "data.dir=" + c.data_copy(lambda d: shutil.copy(d / "val_000000.bin", d / "train_000009.bin"))
        ),
        "train_000009.bin: a train shard meta.json does not list",
    ),
    (
        "tokenizer.json of another preparation, same size",
        train,
        lambda c: c.train(
            "data.dir="
            + c.data_copy(
                lambda d: (
                    prepare.main(
                        [
                            "--input",
                            c.file("n.txt", "\n".join(str(i * i) for i in range(5000))),
                            "--out",
                            str(c.tmp / "n"),
                            "--vocab-size",
                            "512",
                        ]
                    ),
                    shutil.copy(c.tmp / "n" / "tokenizer.json", d / "tokenizer.json"),
                )
            )
        ),
        "tokenizer.json: not the tokenizer this data was prepared with",
    ),
    (
        "prepare: every document the first's text",
        prepare,
        lambda c: [
            "--input",
            c.file("same.jsonl", '{"text": "the same words"}\n' * 5),
            "--out",
            str(c.tmp / "p"),
            "--tokenizer",
            str(c.data / "tokenizer.json"),
        ],
        "same.jsonl: every document went to validation (the first document's text is always validation",
    ),
    ("prepare: empty --out", prepare, lambda c: ["--input", "builtin:pydoc", "--out", ""], "--out: is empty"),
    (
        "prepare --overwrite into a Hugging Face model folder",
        prepare,
        lambda c: [
            "--input",
            "builtin:pydoc",
            "--overwrite",
            "--vocab-size",
            "300",
            "--out",
            str(Path([c.file("hf/config.json", "{}"), c.file("hf/tokenizer.json", "{}")][0]).parent),
        ],
        "hf: not a prepared folder (no meta.json of prepare's; it holds config.json), so its tokenizer.json is not",
    ),
    (
        "prepare: a WordLevel tokenizer without its unknown token",
        prepare,
        lambda c: [
            "--input",
            c.file("t.txt", "a b"),
            "--out",
            str(c.tmp / "p"),
            "--tokenizer",
            c.file(
                "wl.json",
                json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0, "</s>": 1}, "unk_token": "<unk>"}}),
            ),
        ],
        "wl.json: cannot encode the text (WordLevel error: Missing [UNK] token from the vocabulary)",
    ),
    (
        "data of another vocabulary",
        train,
        lambda c: c.train("data.vocab_size=1024"),
        "holds data prepared with vocab_size=512, not what [data] asks for",
    ),
    (
        "truncated shard",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: truncate(d / 'train_000000.bin', 0.5))}"),
        "train_000000.bin: truncated shard",
    ),
    (
        "shard shorter than its header",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: truncate(d / 'val_000000.bin', 0.0001))}"),
        "shorter than the 1024-byte header",
    ),
    (
        "corrupt meta.json",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: truncate(d / 'meta.json', 0.5))}"),
        "meta.json: unreadable",
    ),
    (
        "prepared data without meta.json",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: (d / 'meta.json').unlink())}"),
        "holds tokenizer.json but no meta.json (a damaged or unfinished preparation); prepare it again: "
        "fasttrain prepare --out",
    ),
    (
        "missing tokenizer",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: (d / 'tokenizer.json').unlink())}"),
        "tokenizer.json: no such tokenizer file",
    ),
    (
        "missing input files",
        train,
        lambda c: c.train(f"data.dir={c.tmp / 'fresh'}", f'data.inputs=["{c.tmp}/none/*.txt"]'),
        "none/*.txt",
    ),
    (
        "ids beyond the vocabulary, header lying",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lying_shard)}"),
        "train_000000.bin: token id 1000 at position",
    ),
    (
        "doctor: ids beyond the vocabulary",
        doctor,
        lambda c: c.train(f"data.dir={c.data_copy(lying_shard)}"),
        "train_000000.bin: token id 1000 at position 100 is beyond the vocabulary of 512",
    ),
    (
        "meta.json vocabulary not the tokenizer's",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(edit_meta(vocab_size=600))}"),
        "meta.json: vocab_size = 600 disagrees with tokenizer.json's 512",
    ),
    (
        "meta.json counts no val bytes",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(edit_meta(text_bytes={'train': 1, 'val': 0}))}"),
        "meta.json: text_bytes.val = 0, expected a count > 0",
    ),
    (
        "no val split, with --overwrite",
        train,
        lambda c: c.train(
            f"data.dir={c.data_copy(lambda d: [p.unlink() for p in d.glob('val_*.bin')])}",
            out=c.run,
            flags=["--overwrite"],
        ),
        "no val shards",
    ),
    (
        "shard is a FIFO",
        train,
        lambda c: c.train(f"data.dir={c.data_copy(lambda d: fifo(d / 'train_000000.bin'))}"),
        "train_000000.bin: not a regular file",
    ),
    (
        "prepare: input is a FIFO",
        prepare,
        lambda c: ["--input", fifo(c.tmp / "pipe"), "--out", str(c.tmp / "p")],
        "pipe: not a regular file",
    ),
    (
        "prepare: Parquet without the text column",
        prepare,
        lambda c: ["--input", parquet(c, body=["a", "b"]), "--out", str(c.tmp / "p")],
        "docs.parquet: no 'text' column (it has body; choose one with --text-field)",
    ),
    (
        "prepare: Parquet text column of numbers",
        prepare,
        lambda c: ["--input", parquet(c, text=[1, 2]), "--out", str(c.tmp / "p")],
        "docs.parquet: column 'text' is int64, expected strings",
    ),
    (
        "prepare: a .parquet file that is not Parquet",
        prepare,
        lambda c: ["--input", parquet(c, damaged=True), "--out", str(c.tmp / "p")],
        "docs.parquet: not a readable Parquet file",
    ),
    ("empty data.text_field", train, lambda c: c.train('data.text_field=""'), "data.text_field"),
    ("batch larger than the data", train, lambda c: c.train("train.batch_size=8000"), "fewer than one batch"),
    (
        "gpt2-small without GPT-2's tokenizer",
        train,
        lambda c: c.train(
            f"data.dir={c.tmp / 'fresh'}",
            f'data.inputs=["{c.file("a.txt", "some text")}"]',
            config="configs/gpt2-small.toml",
        ),
        "data/gpt2-tokenizer.json: no such tokenizer file; save a model's, e.g. python -c \"from tokenizers import",
    ),
    (
        "a prepared folder contradicted",
        train,
        lambda c: c.train("data.val_fraction=0.3"),
        "holds data prepared with val_fraction=0.1, not what [data] asks for (data.val_fraction = 0.3)",
    ),
    (
        "init_from a model that is not a Llama",
        train,
        lambda c: c.train(
            f"model.init_from={Path(c.file('hf/config.json', json.dumps({'model_type': 'gpt2'}))).parent}"
        ),
        'hf/config.json: model_type = "gpt2" (not "llama")',
    ),
    (
        "init_from a Llama without weights",
        train,
        lambda c: c.train(f"model.init_from={Path(c.file('hf/config.json', json.dumps(LLAMA))).parent}"),
        "hf: holds no model.safetensors or model.safetensors.index.json",
    ),
    ("fasttrain: unknown tool", cli, lambda c: ["trian"], "fasttrain: unknown tool 'trian'; did you mean train?"),
    (
        "mixture: a negative weight",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}", weight=-1}}')),
        "data.sources[0].weight: must be >= 0, got -1.0",
    ),
    (
        "mixture: every weight zero",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}", weight=0}}', f'{{dir="{c.tmp}", weight=0.0}}')),
        "data.sources[*].weight: every weight is 0",
    ),
    (
        "mixture: a NaN weight",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}", weight=nan}}')),
        "data.sources[0].weight: expected a finite number, got nan",
    ),
    (
        "mixture: a weight not a number",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}", weight="0.5"}}')),
        'data.sources[0].weight: expected a finite number, got "0.5" (str)',
    ),
    (
        "mixture: a source folder missing, with --overwrite",
        train,
        lambda c: c.train(
            *mix(c, f'{{dir="{c.data}"}}', f'{{dir="{c.tmp / "none"}"}}'), out=c.run, flags=["--overwrite"]
        ),
        "data.sources[1]: ",
    ),
    (
        "mixture: a source folder empty",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}', f'{{dir="{(c.tmp / "empty").mkdir() or c.tmp / "empty"}"}}')),
        "empty: no prepared data there (no meta.json)",
    ),
    (
        "mixture: a source of another tokenizer",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}', f'{{dir="{other_data(c, 512)}"}}')),
        "data.sources[1].dir = ",
    ),
    (
        "mixture: a source of another vocabulary size",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}', f'{{dir="{other_data(c, 300)}"}}')),
        "has a vocabulary of 300 tokens",
    ),
    (
        "mixture: a source without a validation split",
        train,
        lambda c: c.train(
            *mix(
                c,
                f'{{dir="{c.data}"}}',
                f'{{dir="{c.data_copy(lambda d: [p.unlink() for p in d.glob("val_*.bin")])}"}}',
            )
        ),
        "no val shards",
    ),
    (
        "mixture: a change past the run's end",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}'), "data.mix=[{step=2, weights=[1]}]"),
        "data.mix[0]: the change at step 2 is past the run's last step (train.max_steps = 2)",
    ),
    (
        "mixture: the same folder twice",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}', f'{{dir="{c.data}/."}}')),
        "data.sources[1].dir = ",
    ),
    # checkpoints and resuming
    (
        "sharded checkpoint missing a rank's shard",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_run(c, lambda d: (d / "__0_0.distcp").unlink()))]),
        "__0_0.distcp: missing, a shard of the checkpoint step_0000002",
    ),
    (
        "sharded checkpoint with a truncated shard",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_run(c, lambda d: truncate(d / "__0_0.distcp", 0.5)))]),
        "__0_0.distcp: truncated",
    ),
    (
        "sharded checkpoint whose metadata runs code",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_run(c, lambda d: evil_metadata(c, d)))]),
        ".metadata: not a checkpoint's metadata (UnpicklingError: pathlib.Path.touch is not part of",
    ),
    (
        "export a sharded checkpoint whose metadata runs code",
        export,
        lambda c: [str(sharded_run(c, lambda d: evil_metadata(c, d)))],
        ".metadata: not a checkpoint's metadata (UnpicklingError: pathlib.Path.touch is not part of",
    ),
    (
        "init_from: context shorter than train.seq_len, with --overwrite",
        train,
        lambda c: c.train(
            init_from(c.run, c.tmp, edit_config(max_position_embeddings=16)), out=c.run, flags=["--overwrite"]
        ),
        "hf/config.json: train.seq_len = 32 exceeds model.max_seq_len = 16",
    ),
    (
        "init_from: heads that do not divide the width",
        train,
        lambda c: c.train(
            init_from(c.run, c.tmp, edit_config(num_attention_heads=3, num_key_value_heads=3, head_dim=None))
        ),
        "model.d_model = 32 is not divisible by model.n_heads = 3",
    ),
    (
        "init_from: a RoPE base that is not a number",
        train,
        lambda c: c.train(init_from(c.run, c.tmp, edit_config(rope_theta="abc"))),
        'hf/config.json: rope_theta = "abc" (not a positive number)',
    ),
    (
        "init_from: a width that is not a whole number",
        train,
        lambda c: c.train(init_from(c.run, c.tmp, edit_config(hidden_size=32.5))),
        "hf/config.json: hidden_size = 32.5 (not a positive integer)",
    ),
    (
        "init_from: a NaN weight",
        train,
        lambda c: c.train(init_from(c.run, c.tmp, edit_tensor("model.layers.1.mlp.up_proj.weight", nan))),
        "model.safetensors: model.layers.1.mlp.up_proj.weight holds NaN or infinite values",
    ),
    (
        "doctor: init_from with a NaN weight",
        doctor,
        lambda c: c.train(init_from(c.run, c.tmp, edit_tensor("model.norm.weight", nan))),
        "model.norm.weight holds NaN or infinite values",
    ),
    (
        "init_from: a weight of another shape",
        train,
        lambda c: c.train(
            init_from(c.run, c.tmp, edit_tensor("model.layers.0.self_attn.k_proj.weight", lambda t: t[:8]))
        ),
        "model.layers.0.self_attn.k_proj.weight has shape [8, 32], but ",
    ),
    (
        "init_from: an index naming a file outside the folder",
        train,
        lambda c: c.train(init_from(c.run, c.tmp, index_outside)),
        'model.safetensors.index.json: weight_map names "../elsewhere.safetensors", not a file inside',
    ),
    (
        "init_from: data tokenized with another tokenizer",
        train,
        lambda c: c.train(init_from(c.run, c.tmp, another_tokenizer)),
        "tokenizer.json: not the tokenizer of model.init_from (",
    ),
    (
        "resume with nothing saved",
        train,
        lambda c: c.train(flags=["--resume", "auto"]),
        "out/checkpoints: no checkpoint saved there yet, so nothing to resume",
    ),
    (
        "resume another run's checkpoint into a run",
        train,
        lambda c: c.train(out=c.run_copy(), flags=["--resume", str(c.checkpoint())]),
        "holds a run of its own",
    ),
    (
        "resume another run's directory into a run",
        train,
        lambda c: c.train(out=c.run_copy(), flags=["--resume", str(c.run)]),
        "holds a run of its own",
    ),
    (
        "resume from a missing file",
        train,
        lambda c: c.train(flags=["--resume", str(c.tmp / "gone.pt")]),
        "gone.pt: no such checkpoint",
    ),
    (
        "resume from garbage",
        train,
        lambda c: c.train(flags=["--resume", c.file("junk.pt", b"\x00garbage" * 100)]),
        "junk.pt: not a loadable checkpoint (not a file torch.save wrote)",
    ),
    (
        "resume from a truncated checkpoint",
        train,
        lambda c: c.train(flags=["--resume", c.file("half.pt", c.checkpoint().read_bytes()[:5000])]),
        "half.pt: not a loadable checkpoint (cut short or damaged)",
    ),
    (
        "resume from a checkpoint that runs code",
        train,
        lambda c: c.train(flags=["--resume", unpickling_runs_code(c)]),
        "evil.pt: not a loadable checkpoint (it holds objects other than tensors and plain values",
    ),
    (
        "resume from another program's file",
        train,
        lambda c: c.train(flags=["--resume", str(torch.save({"w": torch.ones(2)}, c.tmp / "w.pt") or c.tmp / "w.pt")]),
        "w.pt: not a fasttrain checkpoint (no model, optimizer, step, config)",
    ),
    (
        "resume another model shape",
        train,
        lambda c: c.train("model.d_model=64", "model.n_layers=3", out=c.run, flags=["--resume", "auto"]),
        "saved by a model of another shape (model.d_model = 32 there, 64 here; model.n_layers = 2 there, 3 here)",
    ),
    (
        "resume with another optimizer",
        train,
        lambda c: c.train("optim.name=sgd", out=c.run, flags=["--resume", "auto"]),
        'saved by a run with optim.name = "adamw", this one has "sgd"',
    ),
    (
        "resume with another batch size",
        train,
        lambda c: c.train("train.batch_size=2", out=c.run, flags=["--resume", "auto"]),
        "cannot continue from it (loader state does not match this loader: batch_size=4 (now 2)",
    ),
    (
        "latest names a missing file",
        train,
        resume_damaged(lambda d: (d / "latest").write_text("step_0000099.pt")),
        "names step_0000099.pt, which is missing",
    ),
    ("latest holds binary bytes", train, resume_damaged(binary_latest), "latest: does not name a checkpoint file"),
    (
        "latest names a path elsewhere",
        train,
        resume_damaged(lambda d: (d / "latest").write_text("../../config.toml")),
        "latest: does not name a checkpoint file",
    ),
    (
        "a directory where latest should be",
        train,
        resume_damaged(latest_a_directory),
        "latest: is a directory, not a pointer file",
    ),
    (
        "a file where checkpoints/ should be",
        train,
        resume_damaged(checkpoints_a_file),
        "checkpoints: is not a directory, so it holds no checkpoints",
    ),
    (
        "a new run beside a file named checkpoints",
        train,
        lambda c: c.train(out=Path(c.file("fresh/checkpoints", "x")).parent),
        "checkpoints: is not a directory, so no checkpoint can be saved there",
    ),
    (
        "export from a binary latest",
        export,
        lambda c: [str(damaged(c, unfinished(binary_latest)))],
        "latest: does not name a checkpoint file",
    ),
    (
        "export from a file where checkpoints/ should be",
        export,
        lambda c: [str(damaged(c, unfinished(checkpoints_a_file)))],
        "checkpoints: is not a directory",
    ),
    (
        "export from a latest naming a missing file",
        export,
        lambda c: [str(damaged(c, lambda d: (d / "latest").write_text("step_0000099.pt")) / "checkpoints" / "latest")],
        "latest: names step_0000099.pt, which is missing",
    ),
    (
        "new run over saved checkpoints",
        train,
        lambda c: c.train(out=c.run),
        "holds checkpoints of an earlier run (up to step 2); continue it with --resume auto",
    ),
    ("export a non-checkpoint", export, lambda c: [c.file("junk.pt", b"PK\x03\x04 nope")], "not a loadable checkpoint"),
    ("export with nothing saved", export, lambda c: [str(c.tmp)], "no checkpoint saved there yet"),
    (
        "export: a distilled run's members training",
        export,
        lambda c: [str(distilled(c, members_trained=False))],
        "distilled/ensemble --split val scores them (sample and export take it too)",
    ),
    # sampling and scoring a trained model
    (
        "sample: --device gpu",
        sample,
        lambda c: [str(c.run), "--device", "gpu"],
        '--device: must be auto, cpu, cuda or cuda:N, got "gpu"',
    ),
    (
        "sample: empty --device",
        sample,
        lambda c: [str(c.run), "--device", ""],
        '--device: must be auto, cpu, cuda or cuda:N, got ""',
    ),
    (
        "sample: --device mps",
        sample,
        lambda c: [str(c.run), "--device", "mps"],
        '--device: must be auto, cpu, cuda or cuda:N, got "mps"',
    ),
    (
        "evaluate: --device meta",
        evaluate,
        lambda c: [str(c.run), "--split", "val", "--device", "meta"],
        '--device: must be auto, cpu, cuda or cuda:N, got "meta"',
    ),
    (
        "export: a damaged latest says no --resume",
        export,
        lambda c: [str(damaged(c, unfinished(binary_latest)))],
        "latest: does not name a checkpoint file (it should hold a name like step_0000100.pt); name a checkpoint file",
    ),
    (
        "export: a file as --out",
        export,
        lambda c: [str(c.run), "--out", c.file("f", "x")],
        "f: is a file, not a directory; cannot write an export into it",
    ),
    (
        "export: --hf of a model a Llama cannot express",
        export,
        lambda c: [str(beyond_llama_run(c)), "--hf"],
        '--hf: a Hugging Face Llama cannot express model.mlp = "relu2" (set model.mlp = "swiglu"), model.qk_norm = '
        "true (set model.qk_norm = false): train with those set to export it; without --hf the weights are written "
        "in fasttrain's layout",
    ),
    (
        "export: --hf into a sharded model's folder",
        export,
        lambda c: [str(c.run), "--hf", "--out", str(Path(c.file("llama/model.safetensors.index.json", "{}")).parent)],
        "llama: holds model.safetensors.index.json, which this export would not replace",
    ),
    (
        "evaluate: unknown task",
        evaluate,
        lambda c: with_lm_eval([str(c.run), "--tasks", "arc_easy,hellaswagg"]),
        "--tasks: unknown task 'hellaswagg' (did you mean",
    ),
    (
        "evaluate: negative --num-fewshot",
        evaluate,
        lambda c: [str(c.run), "--tasks", "arc_easy", "--num-fewshot", "-1"],
        "--num-fewshot: must be >= 0, got -1",
    ),
    (
        "evaluate: --num-fewshot without --tasks",
        evaluate,
        lambda c: [str(c.run), "--split", "val", "--num-fewshot", "5"],
        "--num-fewshot: only with --tasks",
    ),
    (
        "evaluate: --limit 0",
        evaluate,
        lambda c: [str(c.run), "--tasks", "arc_easy", "--limit", "0"],
        "--limit: must be a whole number of documents >= 1 or a fraction in (0, 1), got 0.0",
    ),
    (
        "evaluate: --include-path missing",
        evaluate,
        lambda c: [str(c.run), "--tasks", "mine", "--include-path", str(c.tmp / "tasks")],
        "tasks: no such directory",
    ),
    ("evaluate: --tasks empty", evaluate, lambda c: [str(c.run), "--tasks", ","], "--tasks: no task named"),
    (
        "evaluate: a task's text the run's tokenizer cannot encode",
        evaluate,
        lambda c: wordlevel_run(c.tmp),
        "--tasks: the run's tokenizer cannot encode text outside its vocabulary, which tasks hold (",
    ),
    (
        "train.monitor naming no validation loss of the run",
        train,
        lambda c: c.train('train.monitor="val_loss.web"'),
        "train.monitor = 'val_loss.web': not a validation loss of this run; one of val_loss",
    ),
    (
        "train: eval.tasks with a tokenizer that cannot encode a task's text",
        train,
        lambda c: wordlevel_training(c.tmp),
        "eval.tasks: the run's tokenizer cannot encode text outside its vocabulary",
    ),
    # round five: lm-eval tasks that fail after the model has loaded: one line before it loads
    (
        "evaluate: --num-fewshot above the task's documents",
        evaluate,
        lambda c: [
            str(c.run),
            "--tasks",
            "three",
            "--include-path",
            str(faulty_task(c.tmp / "t", "three")),
            "--num-fewshot",
            "4",
        ],
        "--num-fewshot: 4 examples per prompt, but task three has 3 documents",
    ),
    (
        "train: eval.num_fewshot above the task's documents",
        train,
        lambda c: c.train(
            'eval.tasks=["three"]', f'eval.include_path="{faulty_task(c.tmp / "t", "three")}"', "eval.num_fewshot=5"
        ),
        "eval.num_fewshot: 5 examples per prompt, but task three has 3",
    ),
    (
        "evaluate: a task whose data file is missing",
        evaluate,
        lambda c: [str(c.run), "--tasks", "no_data", "--include-path", str(faulty_task(c.tmp / "t", "no_data"))],
        "--tasks: no_data: lm-eval cannot build the task: FileNotFoundError: Unable to find",
    ),
    (
        "evaluate: a task template naming a missing field",
        evaluate,
        lambda c: [str(c.run), "--tasks", "no_field", "--include-path", str(faulty_task(c.tmp / "t", "no_field"))],
        "--tasks: no_field: lm-eval cannot build the task: UndefinedError: 'title' is undefined",
    ),
    (
        "evaluate: a malformed task YAML in --include-path",
        evaluate,
        lambda c: [str(c.run), "--tasks", "broken", "--include-path", str(faulty_task(c.tmp / "t", "broken"))],
        "--tasks: unknown task 'broken'; --include-path has task files lm-eval could not read: broken.yaml (line 2: ",
    ),
    (
        "sample: missing run directory",
        sample,
        lambda c: [str(c.tmp / "nope")],
        "nope: no such run directory or checkpoint",
    ),
    ("sample: nothing saved", sample, lambda c: [str(c.tmp)], "no checkpoint saved there yet"),
    (
        "sample: a distilled run's members training",
        sample,
        lambda c: [str(distilled(c, members_trained=False))],
        "distilled/checkpoints: no checkpoint saved there yet, so nothing to resume or export; this distilled run's "
        "members are training in ",
    ),
    ("sample: negative top-k", sample, lambda c: [str(c.run), "--top-k", "-3"], "--top-k: must be >= 0 (0: no limit)"),
    ("sample: top-p above 1", sample, lambda c: [str(c.run), "--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (
        "sample: negative temperature",
        sample,
        lambda c: [str(c.run), "--temperature", "-1"],
        "--temperature: must be a finite number >= 0",
    ),
    (
        "sample: empty prompt file",
        sample,
        lambda c: [str(c.run), "--prompt-file", c.file("p.txt", "")],
        "p.txt: is empty",
    ),
    (
        "sample: seed beyond 32 bits",
        sample,
        lambda c: [str(c.run), "--seed", str(2**70)],
        "--seed: must be in [0, 4294967295] (as train.seed), got 1180591620717411303424",
    ),
    (
        "sample: prompt of invalid UTF-8 in argv",
        sample,
        lambda c: [str(c.run), "--prompt", b"ab\xff".decode("utf-8", "surrogateescape")],
        "--prompt: not UTF-8 text",
    ),
    (
        "sample: prompt file of invalid UTF-8",
        sample,
        lambda c: [str(c.run), "--prompt-file", c.file("p.txt", b"\xff")],
        "p.txt: not UTF-8 text",
    ),
    (
        "sample: prompt file is a FIFO",
        sample,
        lambda c: [str(c.run), "--prompt-file", fifo(c.tmp / "p")],
        "p: cannot read (not a regular file)",
    ),
    (
        "sample: 70,000-character prompt",
        sample,
        lambda c: [str(c.run), "--prompt-file", c.file("p.txt", "x" * 70_000)],
        "70,000 characters, more than the 65,536 a prompt may have",
    ),
    (
        "sample: safetensors header a JSON list",
        sample,
        lambda c: [weights_with_list_header(c)],
        "model.safetensors: not a safetensors file (",
    ),
    (
        "sample: garbage checkpoint",
        sample,
        lambda c: [c.file("junk.pt", b"\x00garbage" * 100)],
        "junk.pt: not a loadable checkpoint",
    ),
    (
        "evaluate: missing input",
        evaluate,
        lambda c: [str(c.run), "--input", str(c.tmp / "held_out.txt")],
        "held_out.txt: no such file or directory",
    ),
    (
        "evaluate: nothing to score",
        evaluate,
        lambda c: [str(c.run)],
        "one of the arguments --input --split --tasks is required",
    ),
    (
        "evaluate: empty input",
        evaluate,
        lambda c: [str(c.run), "--input", c.file("empty.txt", "")],
        "empty.txt: no text found",
    ),
    (
        "evaluate: a distilled run's members training",
        evaluate,
        lambda c: [str(distilled(c, members_trained=False)), "--split", "val"],
        "distilled/ensemble --split val scores them (sample and export take it too)",
    ),
    (
        "evaluate: a distilled run's student, not saved yet",
        evaluate,
        lambda c: [str(distilled(c, members_trained=True)), "--split", "val"],
        "distilled/checkpoints: no checkpoint saved there yet, so nothing to resume or export; this distilled run's "
        "members are trained, in ",
    ),
    (
        "evaluate: zero batch size",
        evaluate,
        lambda c: [str(c.checkpoint()), "--split", "val", "--batch-size", "0"],
        "--batch-size: must be >= 1, got 0",
    ),
    # paths that cannot be written
    (
        "hsdp: a shard group that does not divide the world",
        train,
        lambda c: c.train('train.parallel="hsdp"', "train.shard_group_size=3"),
        "train.shard_group_size = 3 does not divide the world of 1 process(es) into whole replicas",
    ),
    (
        "shard_group_size without hsdp",
        train,
        lambda c: c.train("train.shard_group_size=2"),
        'train.shard_group_size: applies only with train.parallel = "hsdp", not "ddp"',
    ),
    (
        "run directory under a file",
        train,
        lambda c: c.train(out=Path(c.file("f", "x")) / "run"),
        "/f is a file, not a folder; set train.out_dir elsewhere",
    ),
    ("run directory is a file", train, lambda c: c.train(out=Path(c.file("f", "x"))), "/f is a file, not a folder"),
    ("export into a file", export, lambda c: [str(c.run), "--out", c.file("f", "x")], "cannot write"),
    ("export: empty --out", export, lambda c: [str(c.run), "--out", ""], "--out: is empty"),
    (
        "export: --hf over a fasttrain export",
        export,
        lambda c: [str(c.run), "--hf", "--out", str(c.run / "final")],
        "final: holds a fasttrain-layout export (config.toml); export into another directory or remove it first",
    ),
    (
        "export: fasttrain layout over an --hf export",
        export,
        lambda c: [str(c.run), "--out", str(Path(c.file("hf/config.json", "{}")).parent)],
        "hf: holds a Hugging Face export (config.json)",
    ),
    (
        "prepare: a damaged Parquet column chunk",
        prepare,
        lambda c: ["--input", damaged_parquet(c), "--out", str(c.tmp / "p"), "--vocab-size", "300"],
        "docs.parquet: damaged Parquet data (Corrupt snappy compressed data.)",
    ),
    # round five: mixtures
    (
        "mixture: two sources given one name",
        train,
        lambda c: c.train(
            *mix(c, f'{{dir="{c.data}", name="web"}}', f'{{dir="{c.data_copy(lambda d: None)}", name="web"}}')
        ),
        'data.sources[1].name = "web" is the name of data.sources[0] too; give each source a name of its own',
    ),
    (
        "mixture: a source name with a space",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}", name="my web"}}')),
        'data.sources[0].name = "my web": a name without spaces',
    ),
    (
        "mixture: a fraction that rounds to step 0",
        train,
        lambda c: c.train(*mix(c, f'{{dir="{c.data}"}}'), "data.mix=[{fraction=0.1, weights=[1]}]"),
        "data.mix[0]: fraction 0.1 of train.max_steps = 2 is step 0, the run's first",
    ),
    (
        "mixture: two fractions that round to one step",
        train,
        lambda c: c.train(
            *mix(c, f'{{dir="{c.data}"}}'),
            "train.max_steps=10",
            "data.mix=[{fraction=0.5, weights=[1]}, {fraction=0.52, weights=[1]}]",
        ),
        "data.mix[1]: at step 5 (fraction 0.52 of train.max_steps = 10 is step 5), not after the change before it",
    ),
    (
        "replay: a recorded progress that is NaN",
        train,
        lambda c: c.train(f"schedule.progress_from={c.file('m.jsonl', progress_record('NaN'))}"),
        "m.jsonl line 2: progress nan is not a finite number >= 0",
    ),
    (
        "replay: a recorded progress that is infinite",
        train,
        lambda c: c.train(f"schedule.progress_from={c.file('m.jsonl', progress_record('1e999'))}"),
        "m.jsonl line 2: progress inf is not a finite number >= 0",
    ),
    # round five: checkpoints
    (
        "sample: a run an interrupted --overwrite set aside",
        sample,
        lambda c: [str(overwrite_killed(c))],
        "/run/.replaced-by-overwrite/checkpoints (the next `python -m fasttrain.train` there puts it back)",
    ),
    (
        "export: a run an interrupted --overwrite set aside",
        export,
        lambda c: [str(overwrite_killed(c) / "checkpoints")],
        "the earlier run, set aside by an --overwrite start stopped before its first checkpoint, is in ",
    ),
    (
        "resume: a bit flipped in a checkpoint file",
        train,
        resume_damaged(lambda d: flip_a_bit(d / "step_0000002.pt")),
        "step_0000002.pt: checksum mismatch, damaged since it was saved (its record ",
    ),
    (
        "export: a bit flipped in a checkpoint file",
        export,
        lambda c: [flipped_copy(c)],
        "flipped.pt: checksum mismatch, damaged since it was saved (its record ",
    ),
    (
        "resume: a bit flipped in a sharded checkpoint's .distcp",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_run(c, lambda d: flip_a_bit(d / "__0_0.distcp")))]),
        "__0_0.distcp: checksum mismatch, damaged since it was saved (CRC-32 ",
    ),
    (
        "sample: a bit flipped in a sharded checkpoint's .distcp",
        sample,
        lambda c: [str(sharded_run(c, lambda d: flip_a_bit(d / "__0_0.distcp")))],
        "__0_0.distcp: checksum mismatch, damaged since it was saved (CRC-32 ",
    ),
    (
        "evaluate: a bit flipped in a sharded checkpoint's state.pt",
        evaluate,
        lambda c: [str(sharded_run(c, lambda d: flip_a_bit(d / "state.pt", 0.3))), "--split", "val"],
        "state.pt: checksum mismatch, damaged since it was saved (its record ",
    ),
    (
        "export: a sharded checkpoint's checksums naming a file outside it",
        export,
        lambda c: [str(sharded_run(c, lambda d: planted_checksum(d, "../../config.toml")))],
        "state.pt: checksums unreadable, damaged since it was saved (one for '../../config.toml', not a file of ",
    ),
    # round five: prepare parts
    *[
        (
            f"prepare --part {spec}",
            prepare,
            lambda c, spec=spec: ["--input", "builtin:pydoc", "--out", str(c.tmp / "p"), f"--part={spec}"],
            f"--part {spec}: expected K/N with 0 <= K < N",
        )
        for spec in ("3/2", "-1/2", "a/b", "0/0")
    ],
    (
        "prepare --part without a tokenizer",
        prepare,
        lambda c: ["--input", "builtin:pydoc", "--out", str(c.tmp / "p"), "--part", "0/2"],
        "part 0/2: no tokenizer; every part needs the same one: give --tokenizer, or learn one first",
    ),
    (
        "prepare --merge with a part missing",
        prepare,
        lambda c: parts_case(c, lambda out: shutil.rmtree(out / "parts" / "1-of-2")),
        "part 1/2: missing; run it",
    ),
    (
        "prepare --merge with a part unfinished",
        prepare,
        lambda c: parts_case(c, lambda out: (out / "parts" / "1-of-2").rename(out / "parts" / ".1-of-2.tmp")),
        "part 1/2: unfinished (killed while it ran); run it again",
    ),
    (
        "prepare --merge of parts from other inputs",
        prepare,
        lambda c: parts_case(
            c, lambda out: (shutil.rmtree(out / "parts" / "1-of-2"), parts_case(c, None, k=1, text="other text"))
        ),
        "part 1/2: made from other inputs than part 0/2",
    ),
    (
        "prepare --merge of parts with another tokenizer",
        prepare,
        lambda c: parts_case(
            c,
            lambda out: (
                shutil.rmtree(out / "parts" / "1-of-2"),
                parts_case(c, None, k=1, tokenizer=c.data_copy(another_tokenizer) + "/tokenizer.json"),
            ),
        ),
        "part 1/2: made from another tokenizer than part 0/2",
    ),
    (
        "prepare --merge of parts with other options",
        prepare,
        lambda c: parts_case(
            c, lambda out: (shutil.rmtree(out / "parts" / "1-of-2"), parts_case(c, None, k=1, val_fraction=0.3))
        ),
        "part 1/2: made from other options than part 0/2",
    ),
    (
        "prepare --part being written by another process",
        prepare,
        lambda c: parts_case(
            c,
            lambda out: (shutil.rmtree(out / "parts" / "1-of-2"), hold(out / "parts" / ".1-of-2.lock")),
            args=["--part", "1/2"],
        ),
        "part 1/2: another prepare (",
    ),
    (
        "prepare --merge while a part is being written",
        prepare,
        lambda c: parts_case(c, lambda out: hold(out / "parts" / ".1-of-2.lock")),
        "part 1/2: still being written (",
    ),
    (
        "prepare --part after the merge",
        prepare,
        lambda c: parts_case(c, lambda out: prepare.main(["--out", str(out), "--merge"]), args=["--part", "0/2"]),
        "already holds prepared data (merged, or prepared whole); it is not changed",
    ),
    (
        "prepare --merge with no parts",
        prepare,
        lambda c: ["--out", str(c.tmp / "none"), "--merge"],
        "none/parts: no parts there; prepare them first with --part K/N",
    ),
    # round six: prepare's modes refuse the options they would ignore
    (
        "prepare --merge with options it does not take",
        prepare,
        lambda c: ["--out", str(c.tmp / "p"), "--merge", "--input", "x.jsonl", "--val-fraction", "0.2"],
        "--merge: does not take --input, --val-fraction; it takes only --out",
    ),
    (
        "prepare --part with --vocab-size",
        prepare,
        lambda c: ["--input", "builtin:pydoc", "--out", str(c.tmp / "p"), "--part", "0/2", "--vocab-size", "600"],
        "--part: does not take --vocab-size; it takes only --out, --input, --tokenizer,",
    ),
    # round six: damaged saves are found before they are parsed, through every entry point
    *[
        (
            f"{name}: a checkpoint file whose zip index names a member in bytes that are not UTF-8",
            program,
            lambda c, args=args: [non_utf8_member(c), *args],
            "non-utf8.pt: unreadable, damaged since it was saved (its zip index: UnicodeDecodeError",
        )
        for name, program, args in (
            ("sample", sample, []),
            ("evaluate", evaluate, ["--split", "val"]),
            ("export", export, []),
            ("export --hf", export, ["--hf"]),
        )
    ],
    (
        "resume: a checkpoint file whose zip index names a member in bytes that are not UTF-8",
        train,
        lambda c: c.train(flags=["--resume", non_utf8_member(c)]),
        "non-utf8.pt: unreadable, damaged since it was saved (its zip index: UnicodeDecodeError",
    ),
    *[
        (
            f"{name}: a sharded checkpoint's .metadata with its first opcode damaged (checked before it is unpickled)",
            program,
            lambda c, args=args: args(str(sharded_run(c, lambda d: flip_a_bit(d / ".metadata", 0.0)))),
            ".metadata: checksum mismatch, damaged since it was saved (CRC-32 ",
        )
        for name, program, args in (
            ("sample", sample, lambda path: [path]),
            ("evaluate", evaluate, lambda path: [path, "--split", "val"]),
            ("export", export, lambda path: [path]),
            ("export --hf", export, lambda path: [path, "--hf"]),
        )
    ],
    (
        "resume: a sharded checkpoint's .metadata with its first opcode damaged (checked before it is unpickled)",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_run(c, lambda d: flip_a_bit(d / ".metadata", 0.0)))]),
        ".metadata: checksum mismatch, damaged since it was saved (CRC-32 ",
    ),
    (
        "resume: two saves swapped by name",
        train,
        resume_damaged(swapped_saves),
        "step_0000002.pt: holds step 1, not the step 2 its name says (saves renamed or swapped)",
    ),
    (
        "sample: a save renamed to another step",
        sample,
        lambda c: [str(damaged(c, swapped_saves) / "checkpoints" / "step_0000001.pt")],
        "step_0000001.pt: holds step 2, not the step 1 its name says (saves renamed or swapped)",
    ),
    (
        "resume: a sharded save whose state.pt is another save's",
        train,
        lambda c: c.train(flags=["--resume", str(sharded_pair(c))]),
        "step_0000002/state.pt: records checksums that none of step_0000002's other files have: state.pt and the "
        "shards do not belong together",
    ),
    *[
        (
            f"{name}: a sharded save whose state.pt is another save's",
            program,
            lambda c, args=args: args(str(sharded_pair(c))),
            "step_0000002/state.pt: records checksums that none of step_0000002's other files have: state.pt and "
            "the shards do not belong together",
        )
        for name, program, args in (
            ("sample", sample, lambda path: [path]),
            ("evaluate", evaluate, lambda path: [path, "--split", "val"]),
            ("export", export, lambda path: [path]),
        )
    ],
]


def progress_record(second: str) -> str:
    """A budgeted run's metrics.jsonl whose second update's recorded progress is `second` (JSON text)."""
    return (
        '{"event": "progress", "step": 1, "progress": 0.5}\n'
        f'{{"event": "progress", "step": 2, "progress": {second}}}\n'
    )


def parts_case(
    c: Case,
    damage,
    k: int | None = None,
    text: str = "",
    tokenizer: str = "",
    val_fraction: float = 0.1,
    args=("--merge",),
) -> list[str]:
    """Arguments for --out c.tmp/pp: parts 0 and 1 of 2 of a small corpus prepared there (only part `k`
    when given, with its own text, tokenizer or options), then `damage(out)`; `args` follow --out."""
    out = c.tmp / "pp"
    docs = str(c.tmp / "pp-in" / "docs.jsonl")
    if text or not os.path.exists(docs):  # written again only to change the inputs
        c.file("pp-in/docs.jsonl", "".join(json.dumps({"text": f"document {i} {text}" * 20}) + "\n" for i in range(30)))
    tokenizer = tokenizer or str(c.data / "tokenizer.json")
    for part in [k] if k is not None else [0, 1]:
        prepare.main(
            [
                "--input",
                docs,
                "--out",
                str(out),
                "--part",
                f"{part}/2",
                "--tokenizer",
                tokenizer,
                "--val-fraction",
                str(val_fraction),
                "--workers",
                "1",
            ]
        )
    if damage:
        damage(out)
    if "--merge" in args:  # which takes --out alone
        return ["--out", str(out), *args]
    return ["--input", docs, "--out", str(out), "--tokenizer", tokenizer, *args]


def hold(lock: Path) -> None:
    """Hold `lock` as another process writing a part would, until the test ends."""
    import fcntl

    fcntl.flock(os.open(lock, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)


@pytest.fixture(scope="module")
def saved_run(pydoc_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved")
    with pytest.raises(SystemExit) as done:
        run_cli(train.main, Case(pydoc_data, run, run).train("checkpoint.interval=1", out=run))
    assert done.value.code == 0
    return run


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_the_table_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("program, make_args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(program, make_args, expected, pydoc_data, saved_run, tmp_path, capsys):
    if "CUDA" in expected and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(saved_run)
    args = make_args(Case(pydoc_data, saved_run, tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run_cli(program.main, args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert expected in err, err
    assert snapshot(saved_run) == before  # nothing already saved was touched
    assert not (tmp_path / "pwned").exists()  # and no checkpoint ran code


def not_planned(name: str) -> str | None:
    """Why a dry run cannot give the run's line for the train row `name`; None where it must."""
    if any(word in name for word in ("resume", "latest", "sharded checkpoint", "--overwrite")):
        return "resuming, and --overwrite, are the started run's: the plan is of a new run"
    if any(word in name for word in ("checkpoints", "run directory")):
        return "train.out_dir's state is checked as the run starts (with --resume and --overwrite): not planned yet"
    if name.startswith("init_from") and "not a Llama" not in name:
        return "the weights are read as the model is built; the plan reads config.json alone"
    if name.startswith("train: eval."):
        return "eval.tasks are checked against the built tokenizer, after the plan"
    if name == "ids beyond the vocabulary, header lying":
        return "found as the first batches are read"
    if name == "--json without --dry-run":
        return "the row is about a missing --dry-run"
    return None


TRAIN_ROWS = [c for c in CASES if c[1] is train and not_planned(c[0]) is None]


@pytest.mark.parametrize("make_args, expected", [c[2:] for c in TRAIN_ROWS], ids=[c[0] for c in TRAIN_ROWS])
def test_a_dry_run_refuses_with_the_runs_line(make_args, expected, pydoc_data, saved_run, tmp_path, capsys):
    """`--dry-run` on each config the run refuses stops with the run's own line, and writes nothing."""
    if "CUDA" in expected and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = make_args(Case(pydoc_data, saved_run, tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, [*args, "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert snapshot(tmp_path) == before
