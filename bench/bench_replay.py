#!/usr/bin/env python
"""Benchmark a replay audit against the capture it audits: SmolLM2-135M, float32, CPU, one sequence.

Each round captures the sequence (``zkllm_hf.capture``, all layers, overwrite) and then replays it
(``zkllm_hf.replay.replay_capture``: one forward through the capture engine with the comparator sink, every
point compared with its file). Capture and replay alternate in one run, so drift in the machine's load hits
both; the medians (min and max beside them) are printed with the machine's name and thread count.

    HF_HUB_OFFLINE=1 python bench/bench_replay.py [--tokens 2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf.contracts import load_contract  # noqa: E402
from zkllm_hf.models import load  # noqa: E402
from zkllm_hf.replay import replay_capture  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = load(None, tokenizer=False).model
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    contract = load_contract("v1")
    times: dict[str, list[float]] = {"capture": [], "replay": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cap"
        for i in range(args.rounds + 1):  # round 0 warms up
            t = time.perf_counter()
            with torch.inference_mode(), zkllm_hf.capture(model, out, overwrite=True):
                model(input_ids=ids)
            cap = time.perf_counter() - t
            t = time.perf_counter()
            outcome = replay_capture(out, model, contract)
            rep = time.perf_counter() - t
            assert all(r.passed for r in outcome.results if r.skipped is None), "a genuine replay must pass"
            if i:
                times["capture"].append(cap)
                times["replay"].append(rep)
            print(f"round {i}{' (warm-up)' if not i else ''}: capture {cap:.2f} s, replay {rep:.2f} s", flush=True)
    print(f"machine: {machine()}")
    print(f"SmolLM2-135M float32, {args.tokens} tokens, {args.rounds} rounds, medians (min-max):")
    for name, ts in times.items():
        print(f"  {name:8s} {statistics.median(ts):7.2f} s ({min(ts):.2f}-{max(ts):.2f})")
    ratio = statistics.median(times["replay"]) / statistics.median(times["capture"])
    print(f"  replay / capture: {ratio:.2f}x")


if __name__ == "__main__":
    main()
