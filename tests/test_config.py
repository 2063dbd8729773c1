"""Tests for fasttrain.config: loading, overrides, round trips, and one-line errors."""

import argparse
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fasttrain_kernels._backend
from fasttrain.compute import device as device_module
from fasttrain.compute.device import CPU_COMPILE_MIN_STEPS, kernels_on, resolve_train
from fasttrain.config import (
    Config,
    KernelsConfig,
    ModelConfig,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_to_toml,
    load_config,
    save_config,
)
from fasttrain.system.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_load_and_validate():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.data.inputs == [] and cfg.data.vocab_size == 0  # a prepared folder's, else builtin:pydoc and 4096
    assert Config().data.inputs is not Config().data.inputs  # no shared mutable default


def test_file_overrides_defaults(tmp_path):
    path = write(
        tmp_path,
        """
        [model]
        d_model = 128
        [optim]
        lr = 1
        [data]
        inputs = ["docs/", "extra/*.txt"]
        sampling = "sequential"
    """,
    )
    cfg = load_config(path)
    assert cfg.model.d_model == 128
    assert cfg.model.n_layers == ModelConfig().n_layers
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.inputs == ["docs/", "extra/*.txt"]
    assert cfg.data.sampling == "sequential"
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        [train]
        batch_size = 32
        device = "cuda"
    """,
    )
    cfg = load_config(
        path,
        [
            "train.batch_size=8",
            "train.device=cpu",  # bare string
            'data.inputs=["a.txt", "b"]',
            "optim.weight_decay=0",  # int for a float field
            'train.out_dir="runs/x"',
            "data.tokenizer=",  # empty bare string
            "train.batch_size=4",  # later wins
        ],
    )
    assert cfg.train.batch_size == 4
    assert cfg.train.device == "cpu"
    assert cfg.data.inputs == ["a.txt", "b"]
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.train.out_dir == "runs/x"
    assert cfg.data.tokenizer == ""


def test_consistent_edge_cases_are_accepted():
    cfg = load_config(
        None,
        [
            "schedule.warmup_steps=2000",
            "train.max_steps=2000",  # warmup may fill the whole run
            "model.vocab_size=300",
            'data.tokenizer="tok.json"',  # size checked later, against the tokenizer
            "schedule.decay=wsd",
            "train.device=cuda:3",
            "optim.max_grad_norm=0",
            "data.prefetch=0",
            "train.compile=false",
            "model.n_kv_heads=1",
            "train.tokens_per_update=8192",  # 2 micro-batches
        ],
    )
    assert cfg.model.vocab_size == 300 and cfg.train.device == "cuda:3"
    assert cfg.train.compile is False and cfg.model.n_kv_heads == 1


def test_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            'data.dir="odd \\"quoted\\" \\\\ path\\nwith ünïcode, \\t tab and \\u007f"',
            'data.inputs=["builtin:docstrings", "a b/*.txt"]',
            "optim.lr=2.0",
            "optim.eps=1e-12",
            "optim.beta1=0.1234567890123",
            "schedule.min_lr=0",
        ],
    )
    run_dir = tmp_path / "runs" / "one"
    path = save_config(cfg, run_dir)
    assert path == run_dir / "config.toml"
    assert load_config(path) == cfg
    save_config(Config(), run_dir)  # overwriting works too
    assert load_config(path) == Config()
    assert [p.name for p in run_dir.iterdir()] == ["config.toml"]  # no temp files left


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optim.name=muon", "optim.muon.lr=0.05", "optim.muon.adjust_lr=match_rms_adamw", "optim.beta2=0.99"],
        ["optim.name=sgd", "optim.sgd.momentum=0.5", "schedule.decay=step", "schedule.step_factor=0.25"],
        ["optim.name=adafactor", "optim.adafactor.d=2"],
    ],
    ids=["muon", "sgd", "adafactor"],
)
def test_round_trip_of_each_optimizer(tmp_path, optimizer):
    """The chosen optimizer's [optim.<name>] table is written and read back; the others' are left out."""
    cfg = load_config(None, optimizer)
    text = config_to_toml(cfg)
    tables = {line for line in text.splitlines() if line.startswith("[optim")}
    assert tables == {"[optim]"} | ({f"[optim.{cfg.optim.name}]"} if cfg.optim.name != "adamw" else set())
    assert load_config(save_config(cfg, tmp_path)) == cfg


def test_nested_tables_in_a_file(tmp_path):
    path = write(tmp_path, '[optim]\nname = "muon"\n\n[optim.muon]\nlr = 0.01\nnesterov = false\n')
    cfg = load_config(path, ["optim.muon.ns_steps=3"])
    assert (cfg.optim.muon.lr, cfg.optim.muon.nesterov, cfg.optim.muon.ns_steps) == (0.01, False, 3)


def test_toml_keeps_floats_floats():
    cfg = Config()
    cfg.optim.lr = 2.0
    cfg.optim.max_grad_norm = math.nan
    cfg.optim.eps = -math.inf
    optim = tomllib.loads(config_to_toml(cfg))["optim"]
    assert optim["lr"] == 2.0 and isinstance(optim["lr"], float)
    assert math.isnan(optim["max_grad_norm"]) and optim["eps"] == -math.inf


def test_argparse_helpers(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 2\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        [str(path), "--set", "train.seq_len=64", "model.n_layers=2", "--set", "train.batch_size=3"]
    )
    assert args.set == ["train.seq_len=64", "model.n_layers=2", "train.batch_size=3"]
    cfg = config_from_args(args)
    assert (cfg.train.seq_len, cfg.model.n_layers, cfg.train.batch_size) == (64, 2, 3)


def test_a_shipped_configs_name_after_set_is_the_config(tmp_path, monkeypatch):
    """`fasttrain train --set train.max_steps=2 base` took `base` as a --set item and said no config was given;
    a path or a .toml name there was the config already."""
    monkeypatch.chdir(tmp_path)  # no file named base here
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "train.max_steps=2", "base"])
    assert (args.config, args.set) == ("base", ["train.max_steps=2"])
    assert config_from_args(args).train.max_steps == 2


FILE, SET = "file", "--set"
MISSING = None  # in place of the file's text: no file at all

BAD_INPUTS = [
    # (file text, overrides, who is blamed, phrases the message must contain)
    pytest.param("[model\n", [], FILE, ["invalid TOML", "line 1"], id="malformed-toml"),
    pytest.param("x = 1\nx = 2\n", [], FILE, ["invalid TOML"], id="duplicate-key"),
    pytest.param(MISSING, [], FILE, ["no such file"], id="missing-file"),
    pytest.param(
        "[modle]\nd_model = 8\n", [], FILE, ["unknown section [modle]", "did you mean [model]?"], id="unknown-section"
    ),
    pytest.param("steps = 5\n", [], FILE, ["steps: expected a [section] table, got 5 (int)"], id="top-level-key"),
    pytest.param(
        "[train]\nbatch_sz = 3\n",
        [],
        FILE,
        ["unknown key train.batch_sz; did you mean train.batch_size?"],
        id="unknown-key",
    ),
    pytest.param(
        '[train]\nbatch_size = "16"\n',
        [],
        FILE,
        ['train.batch_size: expected an integer, got "16" (str)'],
        id="string-for-int",
    ),
    pytest.param(
        "[model]\nn_layers = true\n",
        [],
        FILE,
        ["model.n_layers: expected an integer, got true (bool)"],
        id="bool-for-int",
    ),
    pytest.param(
        "[optim]\nlr = false\n", [], FILE, ["optim.lr: expected a finite number, got false (bool)"], id="bool-for-float"
    ),
    pytest.param(
        "[train]\nmax_steps = 10.5\n", [], FILE, ["train.max_steps: expected an integer, got 10.5"], id="float-for-int"
    ),
    pytest.param("[data.extra]\nx = 1\n", [], FILE, ["unknown key data.extra"], id="nested-table"),
    pytest.param(
        '[data]\nsampling = "shuffled"\n',
        [],
        FILE,
        ['data.sampling: expected one of "random", "sequential", got "shuffled"'],
        id="literal",
    ),
    pytest.param(
        "",
        ['data.batching="dynamic"'],
        SET,
        ['data.batching: expected one of "packed", "padded", "aligned", got "dynamic"'],
        id="batching",
    ),
    pytest.param(
        '[data]\ninputs = ["a", 1]\n', [], FILE, ["data.inputs: expected a list of strings"], id="list-of-non-strings"
    ),
    pytest.param(
        '[data]\ninputs = "a.txt"\n', [], FILE, ["data.inputs: expected a list of strings"], id="string-for-list"
    ),
    pytest.param(
        '[data]\ninputs = [""]\n', [], FILE, ["data.inputs: must be a list of non-empty paths"], id="empty-input"
    ),
    pytest.param("[train]\nbatch_size = 0\n", [], FILE, ["train.batch_size: must be > 0, got 0"], id="not-positive"),
    pytest.param("[optim]\nlr = -0.001\n", [], FILE, ["optim.lr: must be > 0, got -0.001"], id="negative-lr"),
    pytest.param("[optim]\nlr = nan\n", [], FILE, ["optim.lr: expected a finite number, got nan (float)"], id="nan"),
    pytest.param("", ["optim.max_grad_norm=inf"], SET, ["optim.max_grad_norm: expected a finite number"], id="inf"),
    pytest.param("[data]\nprefetch = -1\n", [], FILE, ["data.prefetch: must be in [0, 64]", "got -1"], id="negative"),
    pytest.param(
        "[data]\nprefetch = 100000\n",
        [],
        FILE,
        ["data.prefetch: must be in [0, 64]", "in memory"],
        id="prefetch-unbounded",
    ),
    pytest.param("", ["train.seed=-1"], SET, ["train.seed: must be in [0, 4294967295], got -1"], id="negative-seed"),
    pytest.param("", ["train.seed=99999999999"], SET, ["train.seed: must be in [0, 4294967295]"], id="seed-too-big"),
    pytest.param(
        f'[train]\nsample_prompt = "{"x" * 70_000}"\n',
        [],
        FILE,
        ["train.sample_prompt: must be non-empty", "at most 65,536 characters", "(70,002 characters)"],
        id="50-MB-sample-prompt",
    ),
    pytest.param("[model]\nvocab_size = -1\n", [], FILE, ["model.vocab_size: must be >= 0"], id="negative-vocab"),
    pytest.param(
        "[data]\nval_fraction = 1\n", [], FILE, ["data.val_fraction: must be in [0, 1), got 1.0"], id="fraction"
    ),
    pytest.param("[optim]\nbeta2 = 1.5\n", [], FILE, ["optim.beta2: must be in [0, 1)"], id="beta"),
    pytest.param(
        "[data]\nvocab_size = 256\n",
        [],
        FILE,
        ["data.vocab_size: must be 0 or > 256", "256 bytes"],
        id="tiny-bpe-vocab",
    ),
    pytest.param(
        '[train]\ndevice = "gpu"\n',
        [],
        FILE,
        ['train.device: must be auto, cpu, cuda or cuda:N, got "gpu"'],
        id="device",
    ),
    pytest.param('[train]\ndevice = "cuda:"\n', [], FILE, ["train.device: must be"], id="device-no-index"),
    pytest.param(
        "[model]\nmax_seq_len = 128\n",
        [],
        FILE,
        ["train.seq_len = 256 exceeds model.max_seq_len = 128"],
        id="seq-len-vs-context",
    ),
    pytest.param(
        "[optim]\nlr = 1e-5\n", [], FILE, ["schedule.min_lr = 0.0001 exceeds optim.lr = 1e-05"], id="min-lr-vs-lr"
    ),
    pytest.param(
        "[model]\nn_heads = 3\n",
        [],
        FILE,
        ["model.d_model = 256 is not divisible by model.n_heads = 3"],
        id="heads-vs-width",
    ),
    pytest.param(
        "[model]\nn_kv_heads = 3\n",
        [],
        FILE,
        ["model.n_heads = 4 is not divisible by model.n_kv_heads = 3"],
        id="kv-heads-vs-heads",
    ),
    pytest.param(
        "[model]\nd_model = 20\nn_heads = 4\n",
        [],
        FILE,
        ["model.d_model = 20 / model.n_heads = 4 (an odd head size"],
        id="odd-head-size",
    ),
    pytest.param(
        "[train]\ntokens_per_update = 5000\n",
        [],
        FILE,
        ["train.tokens_per_update = 5000 is not a multiple of train.batch_size x train.seq_len = 16 x 256 = 4096"],
        id="tokens-per-update",
    ),
    pytest.param(
        "[train]\nbatch_size = 4\nseq_len = 64\ntokens_per_update = 512\n",
        ["train.seq_len=100"],
        SET,
        ["train.tokens_per_update = 512 is not a multiple of train.batch_size x train.seq_len = 4 x 100 = 400"],
        id="tokens-per-update-broken-by-a-set-context",
    ),
    pytest.param(
        '[train]\nmax_steps = 100\n[data]\nsources = [{dir = "a"}, {dir = "b"}]\n'
        "mix = [{step = 50, weights = [1.0, 0.0]}]\n",
        ["train.max_steps=40"],
        SET,
        ["the change at step 50 is past the run's last step"],
        id="mix-broken-by-a-set-length",
    ),
    pytest.param(
        '[train]\ncompile = "yes"\n',
        [],
        FILE,
        ['train.compile: expected one of "auto", true, false, got "yes"'],
        id="compile-literal",
    ),
    pytest.param(
        '[train]\nprecision = "fp8"\n',
        [],
        FILE,
        ['train.precision: expected one of "auto", "fp32"'],
        id="precision-literal",
    ),
    pytest.param(
        '[train]\nsample_prompt = ""\n', [], FILE, ["train.sample_prompt: must be non-empty"], id="empty-prompt"
    ),
    pytest.param("[model]\ndropout = 1.0\n", [], FILE, ["model.dropout: must be in [0, 1), got 1.0"], id="dropout"),
    pytest.param(
        "[model]\nmax_seq_len = 128\n",
        ["train.seq_len=200"],
        SET,
        ["train.seq_len = 200 exceeds"],
        id="conflict-blames-set",
    ),
    pytest.param("", ["train.batch_size=0"], SET, ["train.batch_size: must be > 0, got 0"], id="set-out-of-range"),
    pytest.param("", ["batch_size=3"], SET, ["--set batch_size=3: expected SECTION.KEY=VALUE"], id="set-no-section"),
    pytest.param("", ["train.batch_size"], SET, ["expected SECTION.KEY=VALUE"], id="set-no-value"),
    pytest.param(
        "",
        ["train.batch_size=abc"],
        SET,
        ['train.batch_size: expected an integer, got "abc" (str)'],
        id="set-bad-value",
    ),
    pytest.param("", ["dta.seq_len=3"], SET, ["unknown section [dta]; did you mean [data]?"], id="set-unknown-section"),
    pytest.param(
        "", ["schedule.decay=exp"], SET, ['expected one of "cosine", "linear", "constant", "wsd"'], id="set-literal"
    ),
]


@pytest.mark.parametrize("text, overrides, blamed, phrases", BAD_INPUTS)
def test_bad_inputs_raise_one_line_usage_errors(tmp_path, text, overrides, blamed, phrases):
    path = tmp_path / "bad.toml"
    if text is not MISSING:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as excinfo:
        load_config(path, overrides)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: " if blamed == FILE else "--set")
    for phrase in phrases:
        assert phrase in message


def test_a_config_extends_a_base_key_by_key(tmp_path):
    write(
        tmp_path,
        """
        [model]
        d_model = 128
        n_layers = 6
        [train]
        batch_size = 0
    """,
        "base.toml",
    )
    (tmp_path / "sub").mkdir()
    child = write(
        tmp_path,
        """
        extends = "../base.toml"
        [model]
        n_layers = 2
        [train]
        batch_size = 3
    """,
        "sub/child.toml",
    )
    grandchild = write(tmp_path, 'extends = "child.toml"\n[optim]\nlr = 0.5\n', "sub/grandchild.toml")
    cfg = load_config(grandchild, ["model.n_layers=3"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.batch_size, cfg.optim.lr) == (128, 3, 3, 0.5)
    assert load_config(child).model.n_layers == 2
    with pytest.raises(UsageError, match=r"^.*base.toml: train.batch_size: must be > 0, got 0$"):
        load_config(tmp_path / "base.toml")  # a value the base alone gets wrong is blamed on the base


def test_the_350m_config_extends_gpt2_small():
    small, large = (load_config(REPO_ROOT / "configs" / name) for name in ("gpt2-small.toml", "gpt-350m.toml"))
    assert large.data == small.data and large.model.vocab_size == small.model.vocab_size == 50304
    assert (large.model.d_model, large.model.n_layers, large.train.batch_size) == (1024, 24, 16)


@pytest.mark.parametrize(
    "files, message",
    [
        (
            {"a.toml": 'extends = "missing.toml"\n'},
            'a.toml: extends = "missing.toml": {tmp}/missing.toml: no such file',
        ),
        ({"a.toml": "extends = 3\n"}, "a.toml: extends: expected the path of a config file, got 3 (int)"),
        (
            {"a.toml": 'extends = "a.toml"\n'},
            'a.toml: extends = "a.toml" comes back to {tmp}/a.toml: configs cannot extend each other in a circle',
        ),
        (
            {"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\n'},
            'a.toml: extends = "b.toml": {tmp}/b.toml: extends = "a.toml" comes back to {tmp}/a.toml',
        ),
        (
            {"a.toml": 'extends = "b.toml"\n', "b.toml": "[train\n"},
            'a.toml: extends = "b.toml": {tmp}/b.toml: invalid TOML',
        ),
        (
            {
                "a.toml": 'extends = "1.toml"\n',
                **{f"{i}.toml": f'extends = "{i + 1}.toml"\n' for i in range(1, 1100)},
                "1100.toml": "",
            },
            'a.toml: extends = "1.toml": {tmp}/31.toml: extends = "32.toml": a chain of more than 32',
        ),
        (
            {"a.toml": 'extends = "/dev/zero"\n'},
            'a.toml: extends = "/dev/zero": /dev/zero: cannot read (not a regular file)',
        ),
        (
            {"a.toml": 'extends = "pipe"\n', "pipe": None},
            'a.toml: extends = "pipe": {tmp}/pipe: cannot read (not a regular',
        ),
        (
            {"a.toml": 'extends = "big.toml"\n', "big.toml": "#" * (2 << 20)},
            'a.toml: extends = "big.toml": {tmp}/big.toml: larger than 1,048,576 bytes, too large for a config file',
        ),
    ],
    ids=["missing", "not-a-path", "itself", "circle", "bad-base", "1100-files", "dev-zero", "fifo", "2-MiB"],
)
def test_bad_extends_is_a_one_line_error(tmp_path, files, message):
    for name, text in files.items():
        if text is None:  # a FIFO nothing writes to: reading it would wait forever
            os.mkfifo(tmp_path / name)
        else:
            write(tmp_path, text, name)
    with pytest.raises(UsageError) as excinfo:
        load_config(tmp_path / "a.toml")
    assert str(excinfo.value).startswith(f"{tmp_path}/" + message.format(tmp=tmp_path))
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    "base, child, blamed",
    [
        ("[train]\nseq_len = 64\n", "[model]\nmax_seq_len = 32\n", "child.toml"),
        ("[model]\nmax_seq_len = 32\n", "[train]\nseq_len = 64\n", "child.toml"),
        ("[train]\nseq_len = 64\n[model]\nmax_seq_len = 32\n", "", "base.toml"),
    ],
    ids=["child-sets-the-second-key", "child-sets-the-first-key", "base-sets-both"],
)
def test_a_conflict_blames_the_file_that_set_a_key_last(tmp_path, base, child, blamed):
    write(tmp_path, base, "base.toml")
    write(tmp_path, 'extends = "base.toml"\n' + child, "child.toml")
    with pytest.raises(UsageError, match=rf"^{tmp_path}/{blamed}: train.seq_len = 64 exceeds model.max_seq_len = 32"):
        load_config(tmp_path / "child.toml")


def test_no_hint_when_nothing_is_close(tmp_path):
    with pytest.raises(UsageError, match=r"unknown section \[zzzz\]$"):
        load_config(write(tmp_path, "[zzzz]\n"))


def test_unreadable_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        load_config(tmp_path)  # a directory


@pytest.mark.subprocess
def test_cli_reports_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 0\n")
    script = textwrap.dedent("""
        import argparse, sys
        from fasttrain.config import add_config_arguments, config_from_args
        from fasttrain.system.errors import run_cli

        def main(argv):
            parser = argparse.ArgumentParser()
            add_config_arguments(parser)
            config_from_args(parser.parse_args(argv))

        run_cli(main, sys.argv[1:])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), "--set", "train.device=cpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "train.batch_size: must be > 0, got 0" in lines[0]


def test_auto_precision_and_compile_resolve_per_device(monkeypatch):
    """bf16 on CPU only with native bf16 matmuls (timed faster: test_reliability_round7); compile on CPU only for
    long runs; explicit values stay."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # no ISA cap in the way
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(device_module, "cpu_bf16_speedup", lambda: 1.5)  # a CPU whose bf16 pays
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert resolve_train(TrainConfig(), cpu)[0].precision == ("bf16" if native else "fp32")
        assert resolve_train(TrainConfig(precision="fp32"), cpu)[0].precision == "fp32"
    long_run = CPU_COMPILE_MIN_STEPS
    assert resolve_train(TrainConfig(max_steps=long_run - 1), cpu)[0].compile is False
    assert resolve_train(TrainConfig(max_steps=long_run), cpu)[0].compile is True
    assert resolve_train(TrainConfig(max_steps=long_run, compile=False), cpu)[0].compile is False
    on_cuda, note = resolve_train(TrainConfig(max_steps=1), cuda)
    assert on_cuda == TrainConfig(max_steps=1, precision="bf16", compile=True) and note == ""
    # On a CPU the loss goes through the linear cross-entropy's PyTorch path in either precision (no logits held),
    # but not through Triton's interpreter (TRITON_INTERPRET=1, as in this test session where triton is installed)
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", False)
    assert kernels_on(KernelsConfig(), cpu).names() == ["linear_cross_entropy"]
    assert kernels_on(KernelsConfig(linear_cross_entropy=False), cpu).names() == []
    monkeypatch.setattr(fasttrain_kernels._backend, "INTERPRETING", True)
    assert kernels_on(KernelsConfig(), cpu).names() == []
    assert kernels_on(KernelsConfig(linear_cross_entropy=True), cpu).names() == ["linear_cross_entropy"]
    # The AdamW kernel only where an AdamW step runs: the plan said "adamw: on" for SGD and Adafactor runs
    forced = KernelsConfig(linear_cross_entropy=False, adamw=True)
    for optimizer, runs in (("adamw", True), ("muon", True), ("sgd", False), ("adafactor", False)):
        kernels = kernels_on(forced, cpu, optimizer=optimizer)
        assert kernels.adamw is runs, optimizer
        assert runs or f"optim.name = {optimizer} takes no AdamW step" in kernels.reasons[-1]


def test_an_optimizer_chosen_later_makes_the_other_optimizers_table_moot_not_wrong(tmp_path):
    """A Muon config with an [optim.muon] table; `--set optim.name=adamw` on it trains AdamW, the Muon table back at
    its defaults. Where the same source gives both, or a later one sets the moot key, it is still an error."""
    from fasttrain.config import MuonConfig, load_config
    from fasttrain.system.errors import UsageError

    base = tmp_path / "muon.toml"
    base.write_text('[optim]\nname = "muon"\n[optim.muon]\nsecond_moment_beta2 = 0.9\n')
    assert load_config(base).optim.muon.second_moment_beta2 == 0.9
    cfg = load_config(base, ["optim.name=adamw"])
    assert cfg.optim.name == "adamw" and cfg.optim.muon == MuonConfig()
    with pytest.raises(UsageError, match=r'--set: optim.muon.lr: applies only with optim.name = "muon", not "adamw"'):
        load_config(base, ["optim.name=adamw", "optim.muon.lr=0.1"])
    both = tmp_path / "both.toml"
    both.write_text('[optim]\nname = "adamw"\n[optim.muon]\nlr = 0.1\n')
    with pytest.raises(UsageError, match=r"both.toml: optim.muon.lr: applies only with optim.name"):
        load_config(both)
    later = tmp_path / "later.toml"
    later.write_text(f'extends = "{base}"\n[optim]\nname = "sgd"\n')
    assert load_config(later).optim.muon == MuonConfig()  # a file over its base, as --set over a file


def test_a_leading_tilde_in_a_path_is_the_home_folder():
    """A shell leaves `--set train.out_dir=~/runs` as it is: the run made a folder named ~ where it was started,
    and its closing lines named ~/runs, which the shell then expanded to a folder that did not exist."""
    home = os.path.expanduser("~")
    cfg = load_config(
        None, ["train.out_dir=~/runs/a", f"train.teacher=~/t1{os.pathsep}~/t2", "data.inputs=['~/x.txt']"]
    )
    assert cfg.train.out_dir == f"{home}/runs/a" and cfg.data.inputs == [f"{home}/x.txt"]
    assert cfg.train.teacher == f"{home}/t1{os.pathsep}{home}/t2"
    assert load_config(None, ["train.sample_prompt=~ not a path"]).train.sample_prompt == "~ not a path"
    mixture = load_config(None, ['data.sources=[{dir="~/web", weight=1}, {dir="/abs/code", weight=1}]'])
    assert [s.dir for s in mixture.data.sources] == [f"{home}/web", "/abs/code"]
