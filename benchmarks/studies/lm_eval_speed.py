"""Task-scoring speed on the CPU: one local lm-eval task through fasttrain's model (`--model fasttrain`,
fasttrain/evaluation/harness.py) and through lm-eval's own Hugging Face model (`hf`) on the same weights exported
with `export --hf`, both fp32.

    python -m benchmarks.studies.lm_eval_speed [--out benchmarks/results/lm-eval/cpu-lm-eval-DATE.json] [--rounds 2]

The model is the base config's (192 wide, 4 layers, context 256, a 4096-token vocabulary on the embedded
corpus), trained 2 steps: the speed does not depend on what it knows. The tasks are written here, nothing is
downloaded: 100 multiple-choice questions (contexts of 20 to 400 tokens, 4 choices: 400 requests) and 20
documents of up to 2 windows for rolling perplexity. Each model is built once; each round times lm-eval's
simple_evaluate on both tasks, the task index built beforehand, so request building and metrics are in both
times alike. hf runs at its command line's default batch size, 1, and at ours, 16. The wall times depend on what
else the machine runs: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.conftest import FIXED_BASE  # noqa: E402
from benchmarks.studies.common import ROOT  # noqa: E402
from fasttrain import Trainer  # noqa: E402
from fasttrain.config import load_config  # noqa: E402
from fasttrain.evaluation.trained_model import load_trained  # noqa: E402
from fasttrain.export import export  # noqa: E402
from fasttrain.preparation.preparation import prepare  # noqa: E402

CONFIG = ROOT / "configs" / "base.toml"


def write_tasks(folder: Path) -> list[str]:
    from pydoc_data.topics import topics

    from fasttrain.evaluation.harness import write_local_task

    texts = [" ".join(t.split()) for t in topics.values() if len(t) > 3000]
    questions = [
        {
            "question": f"{texts[i % len(texts)][: 100 + 37 * i % 1500]}\nAnswer:",
            "choices": [" yes", " no, it is not", " the module", " a list of items"],
            "label": i % 4,
        }
        for i in range(100)
    ]
    documents = [{"text": texts[i % len(texts)][: 200 + 80 * i]} for i in range(20)]
    write_local_task(folder, "speed_mc", "multiple_choice", questions)
    write_local_task(folder, "speed_ppl", "rolling", documents)
    return ["speed_mc", "speed_ppl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/lm-eval/cpu-lm-eval.json")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fasttrain.evaluation.harness import LM_EVAL_VERSION, FasttrainLM

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lm-eval-speed-") as tmp:
        tmp = Path(tmp)
        prepare(["builtin:pydoc"], tmp / "data", vocab_size=4096, quiet=True)
        cfg = load_config(
            CONFIG,
            [
                *FIXED_BASE,
                f'data.dir="{tmp / "data"}"',
                f'train.out_dir="{tmp / "run"}"',
                "train.device=cpu",
                "train.max_steps=2",
                "train.sample_tokens=0",
                'train.precision="fp32"',
                "train.compile=false",
                "train.tensorboard=false",
            ],
        )
        Trainer(cfg, quiet=True).train()
        export(tmp / "run", tmp / "hf", hf=True)
        names = write_tasks(tmp)
        manager = TaskManager(include_path=str(tmp))
        models = {
            "fasttrain, batch 16": FasttrainLM(load_trained(tmp / "run"), batch_size=16),
            "hf, batch 1": HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=1, device="cpu"),
            "hf, batch 16": HFLM(pretrained=str(tmp / "hf"), dtype="float32", batch_size=16, device="cpu"),
        }
        seconds: dict[str, list[float]] = {name: [] for name in models}
        scores: dict[str, dict] = {}
        for _ in range(args.rounds):  # alternated, so a change in the machine's load falls on all alike
            for name, lm in models.items():
                start = time.perf_counter()
                out = simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0)
                seconds[name].append(round(time.perf_counter() - start, 3))
                scores[name] = {t: {k: v for k, v in r.items() if k != "alias"} for t, r in out["results"].items()}
    median = {name: statistics.median(times) for name, times in seconds.items()}
    result = {
        "what": __doc__.split("\n\n")[0],
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"torch": torch.__version__, "lm_eval": LM_EVAL_VERSION},
        "requests": {"speed_mc": 400, "speed_ppl_documents": 20},
        "seconds": seconds,
        "median_seconds": median,
        "speedup_over_hf_batch_1": round(median["hf, batch 1"] / median["fasttrain, batch 16"], 2),
        "speedup_over_hf_batch_16": round(median["hf, batch 16"] / median["fasttrain, batch 16"], 2),
        "scores": scores,
        "command": "python -m benchmarks.studies.lm_eval_speed --out " + args.out,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("median_seconds", "speedup_over_hf_batch_1", "speedup_over_hf_batch_16")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
