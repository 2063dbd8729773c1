"""`python -m fasttrain.sample` and `python -m fasttrain.evaluate` on a tiny run trained once for the module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain import evaluate, sample
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.formats.prepared_folder import open_prepared
from fasttrain.model.generation import generate_text
from fasttrain.preparation.corpus import resolve_inputs
from fasttrain.preparation.preparation import plan_split, prepare, split_documents
from fasttrain.system.errors import run_cli
from fasttrain.training.trainer import Trainer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained_run(pydoc_data, tmp_path_factory) -> tuple[Path, dict]:
    """A 2-step tiny run whose one evaluation covers the whole val split; its directory and summary.
    Its corpus is a small part of the embedded one (pydoc_data's tokenizer), so scoring it all is quick."""
    from pydoc_data.topics import topics

    src = tmp_path_factory.mktemp("small")
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": topics[k][:800]}) + "\n" for k in sorted(topics)[:24]))
    tokenizer = str(pydoc_data / "tokenizer.json")
    prepare([str(src / "docs.jsonl")], src / "data", tokenizer_path=tokenizer, val_fraction=0.25, quiet=True)
    out = src / "run"
    summary = Trainer(
        tiny_config(
            src / "data",
            out,
            f"data.tokenizer={tokenizer}",
            "data.val_fraction=0.25",
            "train.max_steps=2",
            "train.eval_steps=100000",
            "train.sample_tokens=0",
        ),
        quiet=True,
    ).train()
    return out, summary


def cli(main, *args: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        run_cli(main, list(args))
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    return out


def test_final_weights_and_checkpoints_load_the_same_model(trained_run):
    run, _ = trained_run
    final, saved = load_trained(run), load_trained(run / "checkpoints" / "step_0000002.pt")
    assert final.source == run / "final" and saved.source.name == "step_0000002.pt"
    assert all(torch.equal(a, b) for a, b in zip(final.model.state_dict().values(), saved.model.state_dict().values()))
    assert not final.model.training


def test_sample_streams_what_generate_text_returns(trained_run, capsys):
    run, _ = trained_run
    out = cli(
        sample.main, str(run), "--prompt", "The module", "--max-new-tokens", "40", "--temperature", "0", capsys=capsys
    )  # 40 tokens: past the model's context of 32, so the cache starts over on the way
    trained = load_trained(run)
    assert out == generate_text(trained.model, trained.tokenizer, "The module", 40, temperature=0) + "\n"


def test_a_prompt_ending_in_a_space_samples_a_word_after_it(trained_run, capsys):
    """The README's `--prompt "The "` sampled "The  oi": its trailing space was a token of its own, and the model's next
    token brought a space of its own (the BPE's words start with one). The space now joins the first token sampled."""
    run, _ = trained_run
    for seed in range(6):
        args = [str(run), "--prompt", "The ", "--max-new-tokens", "3", "--seed", str(seed)]
        out = cli(sample.main, *args, capsys=capsys)
        assert out.startswith("The ") and not out[4].isspace(), repr(out)
    out = cli(sample.main, str(run), "--prompt", "The  ", "--max-new-tokens", "3", "--temperature", "0", capsys=capsys)
    assert out.startswith("The  ") and not out[5].isspace(), repr(out)  # two spaces typed, two kept


def test_sample_seeded_samples_repeat(trained_run, tmp_path, capsys):
    run, _ = trained_run
    (tmp_path / "prompt.txt").write_text("Lists")
    args = [
        str(run),
        "--prompt-file",
        str(tmp_path / "prompt.txt"),
        "--max-new-tokens",
        "6",
        "--num-samples",
        "2",
        "--seed",
        "1",
        "--top-p",
        "0.9",
    ]
    first = cli(sample.main, *args, capsys=capsys)
    assert first == cli(sample.main, *args, capsys=capsys) and first.count("Lists") == 2 and "\n---\n" in first


def test_evaluate_val_split_is_the_trainers_val_bpb(trained_run):
    run, summary = trained_run
    metrics = evaluate.score_split(load_trained(run), "val", 4, CPU)
    assert metrics["bpb"] == pytest.approx(summary["val_bpb"], rel=1e-4)
    assert metrics["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)  # the command line: test_both_command_lines


@pytest.fixture(scope="module")
def held_out(trained_run, tmp_path_factory) -> Path:
    """The run's val documents written out as a JSONL file: text the run never prepared as such."""
    trained = load_trained(trained_run[0])
    sources = resolve_inputs(trained.cfg.data.inputs)
    split = plan_split(sources, "text", trained.cfg.data.val_fraction)
    docs = [piece.text for which, piece, _ in split_documents(sources, "text", split) if which == "val"]
    path = tmp_path_factory.mktemp("held_out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_evaluate_text_never_prepared(trained_run, held_out):
    """The val documents, read from a file and scored in the run's batches, score as the val split's own text."""
    run, _ = trained_run
    trained = load_trained(run)
    metrics = evaluate.score_inputs(trained, [str(held_out)], 4, CPU)
    val = open_prepared(trained.cfg.data.dir)
    assert metrics == pytest.approx(
        evaluate.score_text(trained, val.dir, "val", val.meta["text_bytes"]["val"], 4, CPU), rel=1e-5
    )


def own_tokens_loss(trained, texts: list[str]) -> tuple[float, int]:
    """The summed loss in nats of each text's own tokens, each text after an end-of-text token in a forward of its own
    (transformers' `model([bos] + tokens)`), and how many tokens that is."""
    nats, counted = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[trained.tokenizer.eot_id, *trained.tokenizer.encode(text)]])
            logits = trained.model(ids)[0, :-1].double()
            nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            counted += ids.shape[1] - 1
    return nats, counted


@pytest.mark.parametrize(
    "texts",
    [
        ["Dictionaries map keys to values: d[k] = v."],
        ["The module object.", "Strings are immutable."],  # the second sees not the first
    ],
)
def test_evaluate_input_counts_the_texts_own_tokens(trained_run, tmp_path, texts):
    """Bits per byte is the summed loss of the text's own tokens in bits over its UTF-8 bytes: the end-of-text token
    before a document conditions its first token but was counted in the tokens per byte (a 69-byte text 4% high, a
    1,693-byte one 0.24%) and, between documents, in the loss."""
    trained = load_trained(trained_run[0])
    window = trained.cfg.train.seq_len + 1  # all in one: windowing is not what is tested
    assert sum(1 + len(trained.tokenizer.encode(t)) for t in texts) <= window
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    metrics = evaluate.score_inputs(trained, [str(tmp_path / "texts.jsonl")], 4, CPU)
    nats, counted = own_tokens_loss(trained, texts)
    text_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)
    assert metrics["loss"] == pytest.approx(nats / counted, rel=1e-5)
    assert metrics["ppl"] == pytest.approx(math.exp(nats / counted), rel=1e-5)


def test_evaluate_input_never_cuts_a_document_that_fits_a_window(trained_run, tmp_path):
    """Documents of at most a window each, many more than a window in all: each is scored with all its context, as
    transformers scores it alone (packed windows cut the ones across a window's edge, losing their opening)."""
    trained = load_trained(trained_run[0])
    window = trained.cfg.train.seq_len
    texts = [f"Item {i}: the module object holds {i * 7} names and a docstring." for i in range(12)]
    assert all(1 + len(trained.tokenizer.encode(t)) <= window + 1 for t in texts)
    assert sum(1 + len(trained.tokenizer.encode(t)) for t in texts) > 3 * window
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    metrics = evaluate.score_inputs(trained, [str(tmp_path / "texts.jsonl")], 4, CPU)
    nats, _ = own_tokens_loss(trained, texts)
    assert metrics["bpb"] == pytest.approx(nats / (math.log(2) * sum(len(t.encode()) for t in texts)), rel=1e-5)


def test_evaluate_input_of_a_binary_file_says_it_is_not_text(trained_run, tmp_path, capsys):
    """A prepared shard given as --input is read as text like any file, and says so: its bytes are mostly invalid
    UTF-8, each scored as U+FFFD; text says nothing."""
    trained = load_trained(trained_run[0])
    shard = sorted(Path(trained.cfg.data.dir).glob("*train_*.bin"))[0]
    evaluate.score_inputs(trained, [str(shard)], 4, CPU)
    assert f"note: {shard}: " in capsys.readouterr().err
    (tmp_path / "text.txt").write_text("Dictionaries map keys to values.")
    evaluate.score_inputs(trained, [str(tmp_path / "text.txt")], 4, CPU)
    assert capsys.readouterr().err == ""


@pytest.mark.subprocess
def test_both_command_lines(trained_run, held_out):
    run, summary = trained_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sampled = subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.sample",
            str(run),
            "--prompt",
            "-",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ],
        input="The",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert sampled.returncode == 0 and sampled.stdout.startswith("The"), sampled.stderr
    scored = subprocess.run(
        [
            sys.executable,
            "-m",
            "fasttrain.evaluate",
            str(run / "checkpoints"),
            "--input",
            str(held_out),
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    expected = evaluate.score_inputs(load_trained(run / "checkpoints"), [str(held_out)], 4, CPU)["bpb"]
    assert scored.returncode == 0 and f"bpb {expected:.4f}" in scored.stdout, scored.stderr


def test_a_tiny_temperature_samples_greedily(trained_run, capsys):
    """1e-40 would divide the logits into inf and nan probabilities; it samples as temperature 0 does."""
    run, _ = trained_run
    args = [str(run), "--prompt", "The module", "--max-new-tokens", "8", "--seed", "3"]
    greedy = cli(sample.main, *args, "--temperature", "0", capsys=capsys)
    with pytest.raises(SystemExit) as done:
        run_cli(sample.main, [*args, "--temperature", "1e-40"])
    out, err = capsys.readouterr()
    assert done.value.code == 0 and out == greedy
    assert err == "note: --temperature 1e-40 is below 1e-06: sampling greedily, as with 0\n"


class CountingCodec:
    """A trained tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def test_streaming_decodes_each_token_a_bounded_number_of_times(trained_run):
    """Streamed pieces join to the returned text, and decoding them costs O(1) per token: re-decoding
    every token so far each time made a 32,000-token sample 8x slower than its generation."""
    trained = load_trained(trained_run[0])
    codec, pieces, n = CountingCodec(trained.tokenizer), [], 300
    text = generate_text(
        trained.model, codec, "The module", n, temperature=1.0, top_k=None, seed=0, on_text=pieces.append
    )
    assert "The module" + "".join(pieces) == text
    assert codec.decoded < 40 * n  # was about n * n / 2


def test_evaluate_caps_a_batch_larger_than_the_split(trained_run, capsys):
    """--batch-size 100000 on a split of a few dozen rows scores as batches of the run's size do, in one
    batch of the split's rows, not 100,000 rows of filler."""
    run, summary = trained_run
    out = cli(evaluate.main, str(run), "--split", "val", "--batch-size", "100000", "--device", "cpu", capsys=capsys)
    assert f"bpb {summary['val_bpb']:.4f}" in out


@pytest.mark.subprocess
def test_a_prompt_of_invalid_utf8_on_stdin_is_one_line(trained_run):
    sampled = subprocess.run(
        [sys.executable, "-m", "fasttrain.sample", str(trained_run[0]), "--prompt", "-", "--device", "cpu"],
        input=b"The \xff\xfe",
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    assert sampled.returncode == 2
    assert sampled.stderr.decode() == "error: --prompt -: stdin: not UTF-8 text\n"


def test_scores_are_logged_at_a_sharded_checkpoints_step(tmp_path):
    """evaluate --tasks logs its eval_tasks event at the step of the weights it scored: a sharded checkpoint is a
    step_N folder, whose step and run were missed (only a step_N.pt file was read as a checkpoint). final/ names the
    scale its output layer carries (checkpoint.fit_temperature): those are not that step's weights as saved."""
    from fasttrain.evaluate import scored_weights

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text('{"event": "end", "step": 4}\n')
    assert scored_weights(run / "checkpoints" / "step_0000004") == (run.resolve(), 4, 1.0)
    assert scored_weights(run / "checkpoints" / "step_0000002.pt") == (run.resolve(), 2, 1.0)
    (run / "final").mkdir()
    assert scored_weights(run / "final") == (run.resolve(), 4, 1.0)
    # final/ holding an earlier step's weights (checkpoint.final_weights = "best"), its output layer scaled
    (run / "metrics.jsonl").write_text('{"event": "end", "step": 4, "weights_step": 2, "weights_scale": 0.9}\n')
    assert scored_weights(run / "final") == (run.resolve(), 2, 0.9)
    assert scored_weights(run / "checkpoints" / "step_0000002.pt") == (run.resolve(), 2, 1.0)  # the save as trained
