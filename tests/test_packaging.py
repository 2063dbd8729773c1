"""fasttrain installed, not cloned: the shipped configs by name (`fasttrain train base`, `configs`, `init`), the
package list in pyproject.toml, and (second tier) the wheel itself, built and installed into a fresh virtual
environment and run from a directory outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from fasttrain import cli, init
from fasttrain.config import shipped
from fasttrain.system.errors import run_cli

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def run(program, args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        run_cli(program, args)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_every_package_of_the_tree_is_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("fasttrain", "fasttrain_kernels")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert listed == found | {"fasttrain.config_files"}  # the wheel's name for configs/


def test_a_clone_imports_the_same_kernels_as_kernels_and_as_fasttrain_kernels():
    """kernels/ in a clone re-exports fasttrain_kernels: the same objects, every one of them, not copies."""
    import fasttrain_kernels
    import kernels

    assert kernels.__all__ == fasttrain_kernels.__all__ and {"FusedAdamW", "rms_norm"} <= set(kernels.__all__)
    for name in fasttrain_kernels.__all__:
        assert getattr(kernels, name) is getattr(fasttrain_kernels, name), name


def test_configs_lists_every_shipped_file_with_one_line(capsys):
    code, out, _ = run(cli.main, ["configs"], capsys)
    assert code == 0
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
    assert names == list(shipped.available()) and len(names) >= 3
    for name in names:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert len(line.split()) > 3  # the name and its description


def test_a_name_runs_the_shipped_config_from_any_directory_and_a_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.locate("base") == (str(ROOT / "configs" / "base.toml"), True)
    (tmp_path / "base").write_text("[train]\nmax_steps = 3\n")
    assert shipped.locate("base") == ("base", False)  # a file of that name here wins
    assert shipped.locate("sub/x.toml") == ("sub/x.toml", False)  # a path: its error comes where it is read


def test_a_name_runs_the_copy_init_wrote_here_and_says_so(tmp_path, monkeypatch, capsys):
    """`fasttrain init base` writes ./base.toml, and `fasttrain train base` then ran the shipped config, silently:
    the copy here runs, and the config line says it is not the shipped one."""
    from fasttrain import init
    from fasttrain.config.arguments import config_line

    monkeypatch.chdir(tmp_path)
    assert init.main(["base"]) == 0 and "fasttrain train base.toml" in capsys.readouterr().out
    assert shipped.locate("base") == ("base.toml", False)
    assert config_line("base") == f"config: {tmp_path / 'base.toml'} (a file here, not the shipped 'base')"
    (tmp_path / "base").write_text("[train]\nmax_steps = 3\n")
    assert shipped.locate("base") == ("base", False)  # the name itself, a file, first


@pytest.mark.parametrize(
    "make, args, expected",
    [
        (
            None,
            ["train", "bse"],
            "bse: neither a config file nor a shipped config; shipped: base, gpt-350m, gpt2-small",
        ),
        ("dir", ["train", "base"], "base: is a directory here and the name of a shipped config"),
        (None, ["init", "nope"], "'nope': not a shipped config; one of base, gpt-350m, gpt2-small"),
        ("file", ["init", "base", "mine.toml"], "mine.toml: exists; give another PATH, or --overwrite to replace it"),
        ("file", ["init", "gpt-350m", "mine.toml"], "mine.toml: exists"),
    ],
)
def test_bad_names_and_init_over_a_file_are_one_line(make, args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if make == "dir":
        (tmp_path / "base").mkdir()
    if make == "file":
        (tmp_path / "mine.toml").write_text("# mine\n")
    code, _, err = run(cli.main, args, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    if make == "file":
        assert (tmp_path / "mine.toml").read_text() == "# mine\n"  # untouched
        assert not (tmp_path / "gpt2-small.toml").exists()  # nothing written before the refusal


def test_init_writes_a_copy_with_the_file_it_extends(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(init.main, ["gpt-350m", "runs/"], capsys)
    assert code == 0 and "wrote runs/gpt-350m.toml (with runs/gpt2-small.toml, which it extends)" in out
    for name in ("gpt-350m", "gpt2-small"):
        assert (tmp_path / "runs" / f"{name}.toml").read_bytes() == (ROOT / "configs" / f"{name}.toml").read_bytes()
    code, _, err = run(init.main, ["gpt-350m", "runs/"], capsys)
    assert code == 2 and "runs/gpt-350m.toml: exists" in err
    (tmp_path / "runs" / "gpt-350m.toml").write_text("# edited\n")
    code, _, _ = run(init.main, ["gpt-350m", "runs/", "--overwrite"], capsys)
    assert (
        code == 0
        and (tmp_path / "runs" / "gpt-350m.toml").read_bytes() == (ROOT / "configs/gpt-350m.toml").read_bytes()
    )


@pytest.mark.second_tier
@pytest.mark.subprocess
def test_the_wheel_runs_the_main_job_from_outside_the_checkout(tmp_path):
    """python -m build gives the sdist and wheel; the wheel, installed with its dependencies into a fresh
    virtual environment, runs `fasttrain train base`, sample and evaluate, and imports fasttrain_kernels, in a folder
    outside the checkout (so nothing of the clone can be imported)."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], check=True, capture_output=True, timeout=600
    )
    wheel = next(dist.glob("fasttrain-*.whl"))
    assert next(dist.glob("fasttrain-*.tar.gz"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    torch = __import__("torch").__version__.split("+")[0]  # the torch this suite runs on, first: no CUDA packages
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch}"], check=True, timeout=900)
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the embedded corpus prepared anew, as on a new machine

    def fasttrain(*args: str) -> str:
        done = subprocess.run(["fasttrain", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert fasttrain("--version").strip() == f"fasttrain {__import__('fasttrain').__version__}"
    assert "gpt2-small" in fasttrain("configs")
    out = fasttrain("train", "base", "--set", "train.max_steps=2", "train.out_dir=run", "train.device=cpu")
    assert "config: base (shipped," in out and (work / "run" / "final").is_dir()
    assert fasttrain("sample", "run", "--max-new-tokens", "8").strip()
    assert "bpb" in fasttrain("evaluate", "run", "--split", "val")
    where = subprocess.run(
        [python, "-c", "import fasttrain, fasttrain_kernels; print(fasttrain.__file__, fasttrain_kernels.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and str(env_dir) in where
    # The wheel ships no top-level `kernels`: Hugging Face's package of that name installs beside it.
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.split("/")[0] == "kernels"]
