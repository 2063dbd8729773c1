"""A transformers Llama trained as it is, with kernels.patch_hf_model, and with Liger-Kernel's patch
(when liger_kernel is installed): tokens/s and peak memory of the same training steps.

    python -m benchmarks.studies.hf_patch [--out FILE.json]

Each variant builds the same random LlamaForCausalLM (GPT-2-small sized, a 32K vocabulary) with fp32
weights under bf16 autocast and AdamW, as a transformers Trainer with bf16=True runs it; the labels are
the inputs (the loss shifts them). Steps are timed one by one with CUDA events after
3 warm-up steps, eager (no torch.compile). The gpu_check `hf` stage runs this; the dry run is a tiny
model on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from benchmarks.conftest import sizes

VARIANTS = ("unpatched", "fasttrain", "liger")
WARMUP = 3


def llama(device: torch.device) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **sizes(
            dict(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=2048,
                num_hidden_layers=12,
                num_attention_heads=12,
                num_key_value_heads=4,
                max_position_embeddings=2048,
            ),
            dict(
                vocab_size=300,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            ),
        )
    )
    return transformers.LlamaForCausalLM(config).to(device)


def patch(model: torch.nn.Module, variant: str) -> str | None:
    """Apply `variant`'s patch to `model`; the reason it cannot run here, else None."""
    if variant == "fasttrain":
        from fasttrain_kernels import patch_hf_model

        patch_hf_model(model)
    elif variant == "liger":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            return "liger_kernel is not installed (carry its wheel to measure it)"
        if model.device.type != "cuda":
            return "Liger-Kernel needs a CUDA GPU"
        _apply_liger_kernel_to_instance(model=model)
    return None


def measure(variant: str, steps: int, batch: int, seq_len: int) -> dict:
    """tokens/s (from the median step), step times and peak memory of `steps` timed training steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama(device)
    record = {"variant": variant, "batch": batch, "seq_len": seq_len, "error": patch(model, variant)}
    if record["error"]:
        return record
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            elapsed = begin.elapsed_time(end) / 1e3
        else:
            elapsed = time.perf_counter() - start
        if step >= WARMUP:
            times.append(elapsed)
            losses.append(round(loss.item(), 4))
    median = statistics.median(times)
    record.update(
        tokens_per_s=round(batch * seq_len / median),
        step_ms={"min": round(min(times) * 1e3, 2), "median": round(median * 1e3, 2)},
        losses=losses,
        peak_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None,
    )
    return record


def compare(steps: int | None = None) -> list[dict]:
    """Every variant, one after another in this process (each on a fresh model)."""
    steps = steps or sizes(20, 2)
    batch, seq_len = sizes((16, 1024), (2, 32))
    records = []
    for variant in VARIANTS:
        try:
            records.append(measure(variant, steps, batch, seq_len))
        except torch.OutOfMemoryError as e:
            records.append({"variant": variant, "error": f"out of memory: {str(e).splitlines()[0]}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the records as JSON here too")
    args = parser.parse_args()
    records = compare()
    for r in records:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
