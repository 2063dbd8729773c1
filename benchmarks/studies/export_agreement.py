"""A run's model against its exports: do transformers and llama.cpp compute what fasttrain computes?

    python -m benchmarks.studies.export_agreement RUN [--tokens 256] [--gguf-dtypes fp16 q8_0] [--out FILE]

Exports RUN (a run directory: its final/) with `fasttrain export --hf` and `--gguf` at each dtype into a temporary
folder, then on the first --tokens tokens of the run's validation split compares: the largest difference of the
logits transformers computes from fasttrain's (fp32); for each GGUF file, llama.cpp's token ids for that text, its
perplexity against fasttrain's (relative) and whether greedy decoding gives the same 32 tokens after a 16-token
prompt. Needs transformers, gguf and llama-cpp-python (which builds llama.cpp from source).

Writes one JSON (default benchmarks/results/checkpoints/cpu-export-agreement-<date>.json).
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks.studies.common import ROOT, result_header
from fasttrain.evaluation.trained_model import load_trained
from fasttrain.export import main as export_main
from fasttrain.formats.shards import read_header, token_blocks
from fasttrain.system.errors import ArgumentParser, run_cli

GREEDY, PROMPT = 32, 16


def perplexity(log_probs: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean negative log-probability of each next token of `ids` under `log_probs` (len(ids), vocab)."""
    return math.exp(-log_probs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item())


@torch.no_grad()
def fasttrain_log_probs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """`model`'s log-probabilities (len(ids), vocab), in fp64, at each position of `ids`."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


def llama_cpp_log_probs(llm: Any, ids: list[int]) -> torch.Tensor:
    """llama.cpp's log-probabilities (len(ids), vocab), in fp64, at each position of `ids` (`llm` a fresh
    llama_cpp.Llama made with logits_all=True)."""
    llm.eval(ids)
    return torch.log_softmax(torch.from_numpy(np.array(llm.scores[: len(ids)])).double(), -1)


def greedy(next_token: Callable[[list[int]], int], prompt: list[int]) -> list[int]:
    """GREEDY tokens after `prompt`, each `next_token(ids so far)`."""
    ids = list(prompt)
    for _ in range(GREEDY):
        ids.append(next_token(ids))
    return ids[len(prompt) :]


@torch.no_grad()
def fasttrain_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    return greedy(lambda ids: int(model(torch.tensor([ids]))[0, -1].argmax()), prompt)


def llama_cpp_greedy(llm: Any, prompt: list[int]) -> list[int]:
    def next_token(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[len(ids) - 1]))

    return greedy(next_token, prompt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m benchmarks.studies.export_agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--gguf-dtypes", nargs="+", default=["fp16", "q8_0"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import transformers
    from llama_cpp import Llama

    today = datetime.date.today().isoformat()
    trained = load_trained(args.run)
    model = trained.model.eval().float()
    data_dir = Path(trained.cfg.data.dir)
    val = next(token_blocks(read_header(data_dir / "val_000000.bin")))
    text = trained.tokenizer.tok.decode([i for i in val[: 4 * args.tokens].tolist() if i != trained.tokenizer.eot_id])
    ids = trained.tokenizer.encode(text)[: args.tokens]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    ours_greedy = fasttrain_greedy(model, ids[:PROMPT])
    ours_ppl = perplexity(fasttrain_log_probs(model, ids), ids)
    result = {"run": str(args.run), "tokens": len(ids), "fasttrain_perplexity": ours_ppl}
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        export_main([str(args.run), "--hf", "--out", f"{work}/hf"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{work}/hf", dtype=torch.float32).eval()
        theirs = hf(torch.tensor([ids])).logits[0]
        result["transformers"] = {
            "max_abs_logit_difference": (theirs - ours).abs().max().item(),
            "max_abs_logit": ours.abs().max().item(),
            "same_argmax": bool(torch.equal(theirs.argmax(-1), ours.argmax(-1))),
        }
        for dtype in args.gguf_dtypes:
            export_main([str(args.run), "--gguf", "--dtype", dtype, "--out", f"{work}/{dtype}.gguf"])
            llm = Llama(f"{work}/{dtype}.gguf", n_ctx=max(args.tokens, PROMPT + GREEDY), logits_all=True, verbose=False)
            try:
                llama_ppl = perplexity(llama_cpp_log_probs(llm, ids), ids)
                result[f"llama_cpp_{dtype}"] = {
                    "same_token_ids": llm.tokenize(text.encode(), add_bos=False, special=True)[: len(ids)] == ids,
                    "perplexity": llama_ppl,
                    "relative_to_fasttrain": llama_ppl / ours_ppl - 1,
                    "same_greedy_tokens": llama_cpp_greedy(llm, ids[:PROMPT]) == ours_greedy,
                }
            finally:
                llm.close()
    out = args.out or ROOT / f"benchmarks/results/checkpoints/cpu-export-agreement-{today}.json"
    what = "a run's final/ against its --hf export in transformers and its --gguf exports in llama.cpp"
    out.write_text(json.dumps({**result_header(what, __spec__.name, argv, today), **result}, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
