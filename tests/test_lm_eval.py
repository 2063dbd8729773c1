"""lm-evaluation-harness tasks on a fasttrain run (fasttrain/evaluation/harness.py, `evaluate --tasks`), cross-checked
sample by sample against lm-eval's own Hugging Face model (`hf`) on the run's `export --hf` weights.

Nothing is downloaded: the tasks are YAML files over JSONL files written here, read with HF_DATASETS_OFFLINE=1
and a dataset cache under the test's temporary folder. Skipped where lm-eval or transformers is missing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fasttrain import Trainer
from fasttrain import evaluate as evaluate_cli
from fasttrain.config import load_config
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.export import export
from fasttrain.system.errors import run_cli
from tests.conftest import TINY_GQA, tiny_args, tiny_config, tiny_overrides

# Before lm-eval imports `datasets`, which reads these once: local JSON files only, never the Hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("lm_eval_task_files")  # lm-eval's own task files parsed once (conftest)

WINDOW = 32  # the tiny run's model.max_seq_len: several questions and every document are longer


def with_lm_eval(args: list[str]) -> list[str]:
    """`args` of a bad-input row (tests/test_bad_input.py) that needs lm-eval to say it: skipped without it."""
    pytest.importorskip("lm_eval")
    return args


def lm_eval_or_skip():
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    from fasttrain.evaluation import harness

    return harness


@pytest.fixture(scope="module")
def run(pydoc_data, tmp_path_factory) -> Path:
    """A tiny run (GQA, untied output, base.toml's embedding norm, which the export folds into the table), trained a
    few steps, with its Hugging Face export in RUN/hf."""
    out = tmp_path_factory.mktemp("run")
    Trainer(
        tiny_config(
            pydoc_data,
            out,
            *TINY_GQA,
            "model.tie_embeddings=false",
            "model.embedding_norm=true",
            "train.max_steps=6",
            "train.sample_tokens=0",
        ),
        quiet=True,
    ).train()
    export(out, out / "hf", hf=True)
    return out


def write_tasks(folder: Path) -> Path:
    """Three tasks over JSONL files in `folder`: multiple choice (contexts up to 3x the window), rolling
    perplexity (documents up to 5 windows) and greedy generation to a stop string."""
    from pydoc_data.topics import topics

    write_local_task = lm_eval_or_skip().write_local_task
    texts = [" ".join(t.split()) for t in topics.values()]
    questions = [
        {
            "question": f"{t[: 40 + 60 * (i % 5)]}\nAnswer:",
            "choices": [" yes", " no", " maybe so", " x"],
            "label": i % 4,
        }
        for i, t in enumerate(texts[:12])
    ]
    documents = [{"text": t[: 60 + 90 * i]} for i, t in enumerate(texts[20:26])] + [{"text": ""}]
    prompts = [{"prompt": t[:50], "answer": t[50:60]} for t in texts[30:34]]
    for name, kind, rows in [
        ("mc", "multiple_choice", questions),
        ("ppl", "rolling", documents),
        ("gen", "generate", prompts),
    ]:
        write_local_task(folder, f"tiny_{name}", kind, rows)
    return folder


def wordlevel_data(folder: Path) -> list[str]:
    """--set items of a tiny run on five words prepared with a WordLevel tokenizer of those words and no unknown
    token in its vocabulary, and a local task (tiny_words, in folder/tasks) of words outside it."""
    from fasttrain.preparation.preparation import prepare

    words = ["the", "cat", "sat", "on", "mat"]
    tokenizer = {
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate([*words, "</s>"])}, "unk_token": "[UNK]"},
        "pre_tokenizer": {"type": "Whitespace"},
    }
    (folder / "wordlevel.json").write_text(json.dumps(tokenizer))
    (folder / "docs.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(words[(i * k) % 5] for k in range(60))}) + "\n" for i in range(40))
    )
    prepare([str(folder / "docs.jsonl")], folder / "data", tokenizer_path=str(folder / "wordlevel.json"), quiet=True)
    (folder / "tasks").mkdir()
    lm_eval_or_skip().write_local_task(
        folder / "tasks",
        "tiny_words",
        "multiple_choice",
        [{"question": "the dog sat", "choices": [" on", " mat"], "label": 0}],
    )
    return [
        *tiny_overrides(folder / "data", folder / "run"),
        "data.vocab_size=0",
        "train.max_steps=2",
        "train.sample_tokens=0",
    ]


def wordlevel_run(folder: Path) -> list[str]:
    """`evaluate` arguments scoring tiny_words on a tiny run trained on `wordlevel_data`."""
    Trainer(load_config(None, wordlevel_data(folder)), quiet=True).train()
    return [str(folder / "run"), "--tasks", "tiny_words", "--include-path", str(folder / "tasks")]


def wordlevel_training(folder: Path) -> list[str]:
    """`train` arguments of that run with eval.tasks = tiny_words, scored at its end."""
    return [
        "configs/base.toml",
        "--set",
        *wordlevel_data(folder),
        'eval.tasks=["tiny_words"]',
        f'eval.include_path="{folder / "tasks"}"',
    ]


def faulty_task(folder: Path, fault: str) -> Path:
    """A folder of task YAML files (for --include-path) holding task `fault`, which lm-eval cannot run: "three" (a
    multiple-choice task of three documents), "no_data" (its data file missing), "no_field" (a template naming a
    field its rows lack) or "broken" (YAML that does not parse, which lm-eval's index skips without a word)."""
    rows = [{"question": f"q{i}", "choices": [" a", " b"], "label": i % 2} for i in range(3)]
    folder.mkdir(parents=True, exist_ok=True)
    if fault == "broken":
        (folder / "broken.yaml").write_text("task: broken\n  dataset_path: [\n")
        return folder
    lm_eval_or_skip().write_local_task(folder, fault, "multiple_choice", rows)
    if fault == "no_data":
        (folder / "no_data.jsonl").unlink()
    if fault == "no_field":
        yaml = folder / "no_field.yaml"
        yaml.write_text(yaml.read_text().replace("{{question}}", "{{title}}"))
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def per_sample(results: dict, task: str) -> list:
    """Each document's responses (log-likelihoods and greedy flags, or generated text), in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def close(ours, theirs, tol: float) -> bool:
    if isinstance(ours, (list, tuple)):
        return len(ours) == len(theirs) and all(close(a, b, tol) for a, b in zip(ours, theirs))
    if isinstance(ours, float):
        return abs(ours - theirs) <= tol
    return ours == theirs


def test_every_sample_matches_lm_evals_hugging_face_model_on_the_export(run, tasks, capsys):
    harness = lm_eval_or_skip()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    ours = harness.run_tasks(load_trained(run), names, include_path=str(tasks), batch_size=5, log_samples=True)
    notes = capsys.readouterr().err.count("note: contexts longer than the model's context (32 tokens)")
    theirs = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(run / "hf"), "dtype": "float32"},
        tasks=names,
        device="cpu",
        batch_size=3,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks)),
    )
    for task in names:
        a, b = per_sample(ours, task), per_sample(theirs, task)
        assert close(a, b, 1e-4), (task, a, b)
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_gen"]["exact_match,none"] == theirs["results"]["tiny_gen"]["exact_match,none"]
    ppl = per_sample(ours, "tiny_ppl")
    assert ppl[-1] == [[0.0]] and all(r[0][0] < -10 for r in ppl[:-1])  # the empty document predicts nothing
    assert any(r[0] for r in per_sample(ours, "tiny_gen"))  # something was generated
    assert notes == 1  # the longest questions lose their start, said once


def test_rolling_windows_predict_every_token_once_with_a_full_window_before_it():
    harness = lm_eval_or_skip()
    tokens = list(range(100, 110))
    pairs = harness.rolling_windows(tokens, prefix=0, window=4)
    assert [c for _, c in pairs] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]
    assert [(c + t)[-5:-1] for c, t in pairs] == [[0, 100, 101, 102], [103, 104, 105, 106], [105, 106, 107, 108]]
    assert harness.rolling_windows([], prefix=0, window=4) == []


def test_batching_and_sorting_change_no_score(run):
    """One forward per batch of rows sorted by length: the same numbers as one request at a time."""
    harness = lm_eval_or_skip()
    model = load_trained(run).model
    pairs = [(list(range(1, 2 + 7 * i % 40)), list(range(50, 51 + i % 3))) for i in range(11)]
    together = harness.score_continuations(model, pairs, batch_size=4)
    alone = [harness.score_continuations(model, [p], batch_size=1)[0] for p in pairs]
    assert close(together, alone, 1e-5)
    long = harness.score_continuations(model, [(list(range(1, 100)), [7, 8])], batch_size=1)
    cut = harness.score_continuations(model, [(list(range(100 - WINDOW + 1, 100)), [7, 8])], batch_size=1)
    assert close(long, cut, 1e-6)  # a long context keeps its last max_seq_len + 1 tokens with the continuation


def test_a_context_of_whitespace_alone_is_scored_after_the_end_of_text_token(run):
    """lm-eval moves a context's trailing whitespace into the continuation, so " " left no context: its first token
    was scored from the batch's last position (another request's, or a pad), a figure that changed with the batch."""
    harness = lm_eval_or_skip()
    from lm_eval.api.instance import Instance

    lm = harness.FasttrainLM(load_trained(run), batch_size=4)
    longer = Instance("loglikelihood", {}, ("Assignment of an object to a target list", " is"), 1)
    blank = Instance("loglikelihood", {}, (" ", " the object"), 0)
    alone, beside = lm.loglikelihood([blank])[0], lm.loglikelihood([blank, longer])[0]
    after_eot = harness.score_continuations(lm.model, [([lm.prefix_token_id], lm.tok_encode("  the object"))], 1)
    assert close([alone], [beside], 1e-5) and close([alone], after_eot, 1e-5)
    with pytest.raises(ValueError, match="an empty context"):
        harness.score_continuations(lm.model, [([], [7, 8])], batch_size=1)


def test_evaluate_tasks_prints_logs_and_writes_the_scores(run, tasks, tmp_path, capsys):
    harness = lm_eval_or_skip()
    with pytest.raises(SystemExit) as exit_:
        run_cli(
            evaluate_cli.main,
            [
                str(run),
                "--tasks",
                "tiny_mc,tiny_ppl",
                "--include-path",
                str(tasks),
                "--limit",
                "8",
                "--num-fewshot",
                "1",
                "--device",
                "cpu",
                "--output",
                str(tmp_path / "scores.json"),
            ],
        )
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["step"] == 6 and written["num_fewshot"] == 1 and written["limit"] == 8
    assert written["weights_scale"] == 1.0  # final/ as the run saved it (tiny runs fit no temperature)
    assert set(written["tasks"]) == {"tiny_mc", "tiny_ppl"} and 0 <= written["tasks"]["tiny_mc"]["acc"] <= 1
    assert written["lm_eval"] == metadata.version("lm_eval")
    acc = written["tasks"]["tiny_mc"]["acc"]
    assert any(
        line.split()[:3] == ["tiny_mc", "1", "acc"] and float(line.split()[3]) == round(acc, 4)
        for line in out.splitlines()
    ), out
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "eval_tasks" and events[-1]["step"] == 6
    assert events[-1]["tasks"] == written["tasks"]
    direct = harness.task_scores(
        harness.run_tasks(load_trained(run), ["tiny_mc"], num_fewshot=1, limit=8, include_path=str(tasks), batch_size=4)
    )
    assert direct["tiny_mc"]["acc"] == acc


def test_a_tasks_warnings_are_said_once(run, tmp_path, caplog):
    """lm-eval's warnings about a task (a metric without its aggregation, its direction) came twice: the task was built
    once to check it before the model loaded (task_index) and once to run it."""
    harness = lm_eval_or_skip()
    rows = [{"question": f"q{i}\nAnswer:", "choices": [" yes", " no"], "label": i % 2} for i in range(2)]
    harness.write_local_task(tmp_path, "terse_mc", "multiple_choice", rows)
    yaml = tmp_path / "terse_mc.yaml"
    text = yaml.read_text()
    yaml.write_text(text.replace("    aggregation: mean\n", "").replace("    higher_is_better: true\n", ""))
    with caplog.at_level(logging.WARNING):
        index = harness.task_index(["terse_mc"], str(tmp_path))
        harness.run_tasks(load_trained(run), ["terse_mc"], index=index, batch_size=4)
    said = [r.getMessage() for r in caplog.records if "[Task: terse_mc] metric acc is defined" in r.getMessage()]
    assert len(said) == len(set(said)) == 2, said  # its aggregation's, its direction's


def test_train_scores_eval_tasks_on_its_final_weights(pydoc_data, tasks, tmp_path, capsys):
    """eval.tasks: `fasttrain train` scores the tasks on the final weights at the end, as evaluate --tasks
    does (an eval_tasks event at the last step); an unknown task is refused before anything is written."""
    harness = lm_eval_or_skip()
    from fasttrain import train

    sets = [f"eval.include_path={tasks}", "eval.limit=6", "train.max_steps=3", "train.sample_tokens=0"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(train.main, tiny_args(pydoc_data, tmp_path / "bad", *sets, 'eval.tasks=["tiny_mcq"]'))
    assert exit_.value.code == 2 and "eval.tasks: unknown task 'tiny_mcq'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert train.main(tiny_args(pydoc_data, tmp_path / "run", *sets, 'eval.tasks=["tiny_mc"]')) == 0
    event = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert event["event"] == "eval_tasks" and event["step"] == 3 and event["limit"] == 6
    direct = harness.task_scores(
        harness.run_tasks(
            load_trained(tmp_path / "run"), ["tiny_mc"], num_fewshot=0, limit=6, include_path=str(tasks), batch_size=4
        )
    )
    assert event["tasks"]["tiny_mc"]["acc"] == direct["tiny_mc"]["acc"]


@pytest.mark.subprocess
def test_lm_evals_command_line_runs_the_fasttrain_model(run, tasks, tmp_path):
    """`python -m fasttrain.lm_eval` is lm-eval's command line with `--model fasttrain` known to it."""
    lm_eval_or_skip()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.lm_eval",
            "--model",
            "fasttrain",
            "--model_args",
            f"run={run / 'checkpoints' / 'step_0000006.pt'},device=cpu",
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(tasks),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and "acc" in done.stdout
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1


@pytest.mark.parametrize(
    "version, expected",
    [
        (None, "--tasks needs lm-evaluation-harness, which is not installed: pip install -e '.[eval]'"),
        ("0.3.0", "lm-eval 0.3.0 is installed, but --tasks supports lm-eval>=0.4.9,<0.5"),
        ("0.5.1", "lm-eval 0.5.1 is installed, but --tasks supports lm-eval>=0.4.9,<0.5"),
    ],
)
def test_lm_eval_missing_or_of_another_version_is_one_line(run, monkeypatch, capsys, version, expected):
    """Checked before the model loads, through the real entry point; the run is left as it was."""
    real = metadata.version

    def installed(name: str) -> str:
        if name != "lm_eval":
            return real(name)
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", installed)
    monkeypatch.delitem(sys.modules, "fasttrain.evaluation.harness", raising=False)  # import it again, checked
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        run_cli(evaluate_cli.main, [str(run), "--tasks", "hellaswag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_continuation_longer_than_the_window_is_refused(run):
    harness = lm_eval_or_skip()
    from fasttrain.system.errors import UsageError

    with pytest.raises(UsageError, match="a continuation of 33 tokens is longer than the model's context"):
        harness.score_continuations(load_trained(run).model, [([1], list(range(33)))], batch_size=1)


def test_text_read_as_the_unknown_token_is_scored_with_one_note(run, capsys):
    """A WordLevel tokenizer with its unknown token encodes any text, unknown words as that token: the request is
    scored (the model never saw those words), and one note says so, whatever the number of requests."""
    import dataclasses

    import tokenizers

    from fasttrain.formats.tokenizer import Tokenizer

    harness = lm_eval_or_skip()
    vocab = {"the": 0, "cat": 1, "[UNK]": 2, "</s>": 3}
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    lm = harness.FasttrainLM(dataclasses.replace(load_trained(run), tokenizer=Tokenizer(wordlevel)))
    assert lm.tok_encode("the cat") == [0, 1] and "note" not in capsys.readouterr().err
    assert lm.tok_encode("the dog") == [0, 2] and lm.tok_encode("a cow") == [2, 2]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reads some of the tasks' text as its unknown token (first in 'the dog')" in err


def test_scores_in_bf16_on_a_gpu_stay_close(run):
    """On a GPU the run's precision scores; bf16 log-likelihoods stay near fp32's."""
    harness = lm_eval_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    model = load_trained(run, "cuda").model
    pairs = [(list(range(1, 20)), [5, 6, 7])]
    fp32 = harness.score_continuations(model, pairs, 1, "fp32")[0][0]
    assert abs(harness.score_continuations(model, pairs, 1, "bf16")[0][0] - fp32) < 0.05 * abs(fp32) + 0.1
