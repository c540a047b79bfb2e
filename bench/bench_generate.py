"""What capture inside generate() costs, per mode, against the same generate() call without it.

Runs on the real default model (SmolLM2-135M), float32, CPU: a left-padded batch of prompts, greedy,
``--new-tokens`` new tokens. Rows are interleaved (plain, prefill, full, steps, plain, ...) so that a burst
of load from another process hits all of them alike; medians and ratios to the plain generate() are
printed side by side.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

import zkllm_hf
from zkllm_hf.models import load

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and",
    "Zero-knowledge proofs let a prover convince a verifier that",
    "Once upon a time",
    "The capital of France is",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row, after one warm-up (default 3)")
    ap.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens (default 16)")
    ap.add_argument("--batch", type=int, default=2, help="prompts per generate() call, 1-4 (default 2)")
    ap.add_argument("--tmp", default="/tmp", help="where the temporary captures go (default /tmp)")
    args = ap.parse_args(argv)
    loaded = load(None)
    model, tok = loaded.model, loaded.tokenizer
    tok.padding_side = "left"
    batch = tok(PROMPTS[: args.batch], return_tensors="pt", padding=True)
    root = Path(tempfile.mkdtemp(prefix="zkllm-bench-gen-", dir=args.tmp))
    times: dict[str, list[float]] = {m: [] for m in ("plain", "prefill", "full", "steps")}
    units: dict[str, int] = {}

    def run(mode: str, i: int) -> float:
        proc = None if mode == "plain" else zkllm_hf.CaptureLogitsProcessor(model, root / f"{mode}-{i}", mode=mode)
        extra = {} if proc is None else {"logits_processor": LogitsProcessorList([proc])}
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **extra)
        if proc is not None:
            units[mode] = len(proc.finalize(out).units)
        elapsed = time.perf_counter() - start
        shutil.rmtree(root / f"{mode}-{i}", ignore_errors=True)
        return elapsed

    try:
        for i in range(args.repeats + 1):
            for mode in times:
                t = run(mode, i)
                if i:  # the first round warms up
                    times[mode].append(t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["plain"])
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}; SmolLM2-135M float32, batch {args.batch}, {args.new_tokens} new tokens, "
          f"medians of {args.repeats}")
    print(f"{'mode':<8} {'median s':>9} {'min s':>7} {'ratio':>6} {'units':>6}")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"{mode:<8} {med:>9.2f} {min(ts):>7.2f} {med / base:>6.2f} {units.get(mode, '-'):>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
