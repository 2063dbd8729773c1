"""lm-evaluation-harness tasks (HellaSwag, ARC, ...) on a trained model: `FasttrainLM`, lm-eval's model API over a
fasttrain model (registered in lm-eval as `fasttrain`), and `run_tasks`, which scores a task list.

Imports from fasttrain: compute.device, evaluation.trained_model, formats.tokenizer, model.ensemble,
model.generation, model.transformer, system.errors.

Importing this module needs lm-eval (the `eval` extra) in the SUPPORTED range, else one UsageError says what to install.

Every request is scored as lm-eval's own `hf` model scores the exported weights (tests/test_lm_eval.py compares them
sample by sample): context and continuation tokenized together and split where the context's tokens end (TemplateLM); an
empty context is the end-of-text token; a longer sequence keeps its last max_seq_len + 1 tokens; a rolling
log-likelihood sums windows of up to max_seq_len new tokens with as much text before them as fits. Only speed differs:
requests sorted by length and batched, the output layer run only where scored.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fasttrain.compute.device import autocast
from fasttrain.system.errors import UsageError

SUPPORTED = ((0, 4, 9), (0, 5, 0))  # lm-eval versions [low, high): the 0.4 API this module uses
SUPPORTED_SPEC = "lm-eval>=0.4.9,<0.5"
INSTALL = f"pip install -e '.[eval]' (or pip install '{SUPPORTED_SPEC}')"


def check_lm_eval() -> str:
    """The installed lm-eval's version; UsageError saying what to install when it is missing or outside SUPPORTED."""
    try:
        version = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if not SUPPORTED[0] <= release < SUPPORTED[1]:
        raise UsageError(f"lm-eval {version} is installed, but --tasks supports {SUPPORTED_SPEC}: {INSTALL}")
    return version


LM_EVAL_VERSION = check_lm_eval()

import lm_eval.models  # noqa: E402, F401  (lm-eval's own models: get_model reads its table only into an empty registry)
from lm_eval import simple_evaluate  # noqa: E402  (after the version check: another version may not import)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402
from lm_eval.utils import simple_parse_args_string  # noqa: E402

from fasttrain.compute.device import use_device  # noqa: E402
from fasttrain.evaluation.trained_model import Trained, inference_precision, load_trained  # noqa: E402
from fasttrain.formats.tokenizer import Tokenizer  # noqa: E402
from fasttrain.model.ensemble import Ensemble  # noqa: E402
from fasttrain.model.generation import stream  # noqa: E402
from fasttrain.model.transformer import Transformer  # noqa: E402

DEFAULT_BATCH_SIZE = 16
PROBE = "Zqx 7? caf\u00e9 \u4e2d\u6587"  # a task's text may hold any of it: letters, digits, punctuation, accents, CJK
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's hf model's default for generation tasks that set no max_gen_toks


@torch.no_grad()
def score_continuations(
    model: Transformer | Ensemble,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    precision: str = "fp32",
) -> list[tuple[float, bool]]:
    """(log P(continuation | context), greedy gives it) per token pair, a pair longer than the window cut to its last
    max_seq_len + 1 tokens; longest first, `batch_size` rows a forward. A context has a token at least."""
    window = model.cfg.max_seq_len
    device = next(model.parameters()).device
    for context, continuation in pairs:
        if not context:  # its first token would be scored from a position before the row's
            raise ValueError("score_continuations: an empty context (give the end-of-text token)")
        if len(continuation) > window:
            raise UsageError(
                f"a continuation of {len(continuation)} tokens is longer than the model's context "
                f"(model.max_seq_len {window}): it cannot be scored"
            )
    rows = [(context + continuation)[-(window + 1) :] for context, continuation in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))  # longest first: each batch's width is its first
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = torch.zeros(len(batch), len(rows[batch[0]]) - 1, dtype=torch.long)
        where, targets = [], []  # (row, position) of every continuation token, and that token
        for r, i in enumerate(batch):
            inputs[r, : len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            n = len(pairs[i][1])
            where += [(r, p) for p in range(len(rows[i]) - 1 - n, len(rows[i]) - 1)]
            targets += pairs[i][1]
        with autocast(precision, device):
            hidden = model.hidden(inputs.to(device))
            rows_at, positions = torch.tensor(where, device=device).unbind(1)
            # The output layer only where a continuation token is predicted: most positions are context.
            logprobs = F.log_softmax(model.logits(hidden[rows_at, positions]).float(), dim=-1)
        targets_t = torch.tensor(targets, device=device)
        picked = logprobs.gather(1, targets_t[:, None]).squeeze(1).cpu()
        greedy = (logprobs.argmax(dim=1) == targets_t).cpu()
        sizes = [len(pairs[i][1]) for i in batch]
        for i, scores, hits in zip(batch, picked.split(sizes), greedy.split(sizes)):
            results[i] = (scores.sum().item(), bool(hits.all()))
    return results


def rolling_windows(tokens: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs predicting each token of `tokens` once, `window` at a time, each with as much text
    before it as fits (after `prefix`): lm-eval `hf`'s perplexity windows."""
    seq = [prefix] + tokens
    pairs = []
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))  # predicts tokens[start:end] = seq[start + 1:end + 1]
        pairs.append((seq[max(0, end - window) : start + 1], seq[start + 1 : end + 1]))
    return pairs


def check_tokenizer(tokenizer: Tokenizer, key: str = "--tasks") -> None:
    """UsageError if `tokenizer` cannot encode text outside its vocabulary, which any task's text may hold (a
    WordLevel vocabulary without its unknown token fails on every word it does not know)."""
    try:
        tokenizer.encode(PROBE)
    except UsageError as e:
        raise UsageError(
            f"{key}: the run's tokenizer cannot encode text outside its vocabulary, which tasks hold ({e})"
        ) from None


@register_model("fasttrain")
class FasttrainLM(TemplateLM):
    """lm-eval's model API over a trained fasttrain model. `run`: anything `sample` and `evaluate` take, or a Trained
    already loaded; from lm-eval's command line, --model_args run=RUN,device=cpu,batch_size=16."""

    def __init__(
        self,
        run: str | Trained,
        device: str = "auto",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **_ignored: Any,
    ):  # lm-eval also passes max_batch_size
        super().__init__()
        self.trained = run if isinstance(run, Trained) else load_trained(run, use_device(device))
        self.model = self.trained.model
        self._device = next(self.model.parameters()).device
        self.precision = inference_precision(self.trained.cfg, self._device)
        # lm-eval's command line passes "auto" or a number as text
        self.batch_size = DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise UsageError(f"batch_size: must be >= 1, got {batch_size}")
        self.max_gen_toks = int(max_gen_toks)
        self.window = self.model.cfg.max_seq_len
        self.truncation_said = self.unknown_said = False
        check_tokenizer(self.trained.tokenizer)  # before scoring anything

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> FasttrainLM:
        """--model_args win over lm-eval's own --device and --batch_size, whose defaults (cuda:0, 1) it always
        passes: `--model_args run=RUN,device=cpu` means the CPU."""
        given = {key: value for key, value in (additional_config or {}).items() if value is not None}
        return cls(**{**given, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> FasttrainLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def eot_token_id(self) -> int:
        return self.trained.tokenizer.eot_id

    @property
    def tokenizer_name(self) -> str:  # lm-eval's request cache keys on it
        return str(self.trained.tokenizer_path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The ids of a task's text (fasttrain's tokenizers add no special tokens). Text the tokenizer reads as
        its unknown token is scored, with one note: the model never sees what that text said."""
        tokenizer = self.trained.tokenizer
        ids = tokenizer.encode(string)
        if tokenizer.unk_id is not None and not self.unknown_said and tokenizer.unk_id in ids:
            self.unknown_said = True
            print(
                f"note: the run's tokenizer ({self.trained.tokenizer_path}) reads some of the tasks' text as its "
                f"unknown token (first in {string[:40]!r}); scores of that text compare what the model cannot see",
                file=sys.stderr,
            )
        return ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """`requests`: ((context, continuation) text, context tokens, continuation tokens), from TemplateLM."""
        # lm-eval gives an empty context ("") as the prefix token, but a context of whitespace alone (" ") goes to the
        # continuation, leaving none: scored after the end-of-text token too, not from another row's last position
        pairs = [(context or [self.prefix_token_id], continuation) for _, context, continuation in requests]
        longest = max((len(c) + len(t) for c, t in pairs), default=0)
        if longest > self.window + 1 and not self.truncation_said:
            self.truncation_said = True
            print(
                f"note: contexts longer than the model's context ({self.window} tokens) lose their start, as with "
                f"lm-eval's hf model (the longest request: {longest} tokens)",
                file=sys.stderr,
            )
        return score_continuations(self.model, pairs, self.batch_size, self.precision)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows = [
            rolling_windows(self.tok_encode(text), self.prefix_token_id, self.window)
            for (text,) in (req.args for req in requests)
        ]
        scores = iter(
            score_continuations(self.model, [w for doc in windows for w in doc], self.batch_size, self.precision)
        )
        return [sum(next(scores)[0] for _ in doc) for doc in windows]

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [self._generate(context, dict(kwargs)) for context, kwargs in (req.args for req in requests)]

    def _generate(self, context: str, kwargs: dict[str, Any]) -> str:
        """The text generated after `context` until a stop string, the end-of-text token or max_gen_toks."""
        tokenizer = self.trained.tokenizer
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        given = [kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kwargs]
        max_new = int(given[0] if given else self.max_gen_toks)
        temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
        top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
        # Room for the answer in the window, as lm-eval's hf model leaves; a model too short for that keeps half
        # its window and slides on as `sample` does.
        keep = self.window - max_new if max_new < self.window else self.window // 2
        ids = (self.tok_encode(context) or [self.prefix_token_id])[-keep:]
        tokens = torch.tensor([ids], dtype=torch.long, device=self._device)
        out: list[int] = []
        with autocast(self.precision, self._device):
            for nxt in stream(self.model, tokens, max_new, temperature=temperature, top_k=top_k, top_p=top_p):
                if nxt.item() == self.eot_token_id:
                    break
                out.append(int(nxt.item()))
                if until and any(stop in tokenizer.decode(out) for stop in until):
                    break
        text = tokenizer.decode(out)
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text


def task_index(
    tasks: Sequence[str],
    include_path: str | None = None,
    num_fewshot: int | None = None,
    keys: tuple[str, str, str] = ("--tasks", "--include-path", "--num-fewshot"),
) -> TaskManager:
    """lm-eval's index of tasks (~12 s), with `include_path`'s YAML files, once every one of `tasks` is found and can
    run with `num_fewshot`: before a model loads. UsageErrors naming `keys` (see check_task)."""
    if include_path and not Path(include_path).is_dir():
        raise UsageError(f"{keys[1]}: {include_path}: no such directory")
    manager = TaskManager(include_path=include_path)
    for name in tasks:
        if not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            broken = unreadable_task_files(Path(include_path)) if include_path else []
            skipped = f"; {keys[1]} has task files lm-eval could not read: {', '.join(broken)}" if broken else ""
            raise UsageError(f"{keys[0]}: unknown task {name!r}{hint}{skipped}; `lm_eval ls tasks` lists them")
    for name in tasks:
        for task_name, task in leaf_tasks(manager, name, keys[0]).items():
            check_task(task_name, task, num_fewshot, keys)
    return manager


def unreadable_task_files(folder: Path) -> list[str]:
    """'FILE: why' for each YAML file under `folder` that is not a mapping as YAML reads it (lm-eval's own tags,
    such as !function, allowed): the files lm-eval's index skips."""
    import yaml

    class AnyTags(yaml.SafeLoader):  # a tag's value is not needed to tell whether the file parses
        pass

    AnyTags.add_multi_constructor("!", lambda loader, suffix, node: None)
    broken = []
    for path in sorted(folder.glob("**/*.yaml")):
        try:
            content = yaml.load(path.read_text(errors="replace"), Loader=AnyTags)  # noqa: S506 (a safe loader)
            if not isinstance(content, dict):
                raise ValueError(f"holds a {type(content).__name__}, not a mapping of keys")
        except yaml.MarkedYAMLError as e:
            where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
            broken.append(f"{path.relative_to(folder)} ({where}{e.problem or e.context})")
        except (yaml.YAMLError, ValueError) as e:
            broken.append(f"{path.relative_to(folder)} ({' '.join(str(e).split())})")
    return broken


def leaf_tasks(manager: TaskManager, name: str, key: str) -> dict[str, Any]:
    """The tasks `name` (a task, group, tag or glob) stands for, built with their data; UsageError naming the task when
    lm-eval cannot build it (a missing data file or dataset, a template naming a field the documents lack)."""

    def flat(found: dict) -> dict[str, Any]:  # a group maps to a dict of its tasks (and subgroups)
        return {
            k: v
            for group, sub in found.items()
            for k, v in (flat(sub).items() if isinstance(sub, dict) else [(str(group), sub)])
        }

    import datasets

    datasets.disable_progress_bars()  # a check says nothing but its one line; building a dataset draws a bar
    # nor what lm-eval logs as it builds a task (a metric without its aggregation...): the run builds it again, and
    # says it then
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return flat(get_task_dict([name], manager))
    except Exception as e:  # noqa: BLE001 (datasets, jinja and lm-eval raise their own kinds; each is said in a line)
        raise UsageError(
            f"{key}: {name}: lm-eval cannot build the task: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ) from None
    finally:
        logging.disable(before)
        datasets.enable_progress_bars()


def check_task(name: str, task: Any, num_fewshot: int | None, keys: tuple[str, str, str]) -> None:
    """UsageError naming the task and cause if lm-eval would fail on `task` after the model loads: a template naming a
    field the first document lacks, or too few documents for the few-shot examples."""
    docs = task.eval_docs
    if len(docs):
        try:
            first = docs[0]
            task.doc_to_text(first)
            task.doc_to_target(first)
            if task.get_config("output_type") == "multiple_choice":
                task.doc_to_choice(first)
        except Exception as e:  # noqa: BLE001 (jinja's UndefinedError...; lm-eval 0.4.13 finds these when it builds the task)
            raise UsageError(
                f"{keys[0]}: {name}: its template cannot be filled from its documents "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from None
    own = task.get_config("num_fewshot")
    shots = own or 0 if num_fewshot is None or own == 0 else num_fewshot  # lm-eval never overrides a task's 0
    if shots == 0:
        return
    # lm-eval leaves the scored document out of its examples (drawing one more) only when the task names its
    # scored split as its few-shot split; otherwise the examples come from fewshot_docs() as they are.
    split = task.get_config("fewshot_split")
    excluded = split is not None and split == task.get_config("test_split")
    available = len(task.fewshot_docs()) - excluded
    if shots > available:
        given = keys[2] if num_fewshot is not None else f"{name}'s num_fewshot"
        raise UsageError(
            f"{given}: {shots} examples per prompt, but task {name} has {max(available, 0)} documents to draw them from"
        )


def run_tasks(
    trained: Trained,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    log_samples: bool = False,
    index: TaskManager | None = None,
) -> dict[str, Any]:
    """lm-eval's results of `tasks` on `trained` (simple_evaluate's dict). `include_path`: a folder of one's own task
    YAML files; `limit`: documents per task (a fraction below 1); `index`: task_index's if built already."""
    model = FasttrainLM(trained, batch_size=batch_size)
    index = task_index(tasks, include_path, num_fewshot) if index is None else index
    return simple_evaluate(
        model=model,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=index,
        log_samples=log_samples,
    )


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results ("acc,none" -> "acc", stderr kept as
    "acc_stderr"); a metric under a filter other than "none" keeps the filter's name ("exact_match,strict")."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue  # "alias", "N/A" stderrs
            metric, kind = key.split(",", 1)
            scores.setdefault(task, {})[metric if kind == "none" else key] = float(value)
    return scores


def scores_table(scores: dict[str, dict[str, float]], shots: dict[str, Any]) -> str:
    """A table of task, shots, metric, value and standard error, one metric per line."""
    lines = [f"{'task':<24} {'shots':>5}  {'metric':<18} {'value':>9} {'stderr':>8}"]
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr," in metric:
                continue
            base, _, kind = metric.partition(",")
            stderr = metrics.get(f"{base}_stderr" + (f",{kind}" if kind else ""))
            lines.append(
                f"{task:<24} {str(shots.get(task, '')):>5}  {metric:<18} {value:>9.4f} "
                f"{'' if stderr is None else f'{stderr:.4f}':>8}"
            )
    return "\n".join(lines)


# The YAML of a local task's kind: what lm-eval reads from each JSONL row and which metric it reports.
TASK_KINDS = {
    "multiple_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_target: label\n'
    'doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
    "    higher_is_better: true\n",
    "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n",
    "generate": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
    'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 8\n  do_sample: false\n'
    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
}


def write_local_task(folder: Path, task: str, kind: str, rows: Sequence[dict[str, Any]]) -> None:
    """An lm-eval task `task` over `rows` in `folder` (for --include-path): "multiple_choice" rows of question, choices,
    label; "rolling" a text; "generate" a prompt and answer. Nothing is downloaded."""
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'datasets-cache'}\ntest_split: test\n{TASK_KINDS[kind]}metadata:\n  version: 1.0\n"
    )
