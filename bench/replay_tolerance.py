"""Measure how far a genuine replay drifts from its capture when it does not run as the capture did.

Captures SmolLM2-135M (CPU) once per configuration and replays it under changed settings, printing per setting
the worst (smallest) fraction of a point's elements within 1, 2, 4 and 8 ulps and the largest deviation in
ulps over every point. These are the numbers the tolerant replay verdict's thresholds (contracts/v1) are
derived from: docs/architecture.md section 2, "Replay".

    python bench/replay_tolerance.py --tokens 256
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import tempfile
from pathlib import Path

import torch

import zkllm_hf
from zkllm_hf.contracts import ULP_STEPS, load_contract
from zkllm_hf.models import load
from zkllm_hf.replay import replay_capture


@contextlib.contextmanager
def settings(threads: int, attn: str | None = None, denormal: bool = False, model=None):
    old_threads, old_attn = torch.get_num_threads(), model.config._attn_implementation
    torch.set_num_threads(threads)
    if attn:
        model.set_attn_implementation(attn)
    torch.set_flush_denormal(denormal)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        model.set_attn_implementation(old_attn)
        torch.set_flush_denormal(False)


def summarise(outcome) -> str:
    stats = [s for s in outcome.stats if s.elements]
    fr = {k: min(s.fraction(k) for s in stats) for k in ULP_STEPS}
    worst = max(stats, key=lambda s: s.max_ulps)
    eq = sum(s.equal for s in stats) / sum(s.elements for s in stats)
    return (
        f"equal {eq:.4f}; min fraction " + ", ".join(f"<={k}: {fr[k]:.4f}" for k in ULP_STEPS)
        + f"; max {worst.max_ulps:.1f} ulps ({worst.max_lsb} LSB, layer {worst.layer} {worst.point})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available, "
          f"torch {torch.__version__}")
    contract = load_contract("v1")
    g = torch.Generator().manual_seed(0)
    for dtype in args.dtypes.split(","):
        model = load(None, dtype=dtype, tokenizer=False).model
        ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=g)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cap"
            with settings(1, "sdpa", model=model), torch.no_grad(), zkllm_hf.capture(model, out):
                model(input_ids=ids)
            variants = {
                "same (1 thread, sdpa)": dict(threads=1, attn="sdpa"),
                "2 threads": dict(threads=2, attn="sdpa"),
                "eager attention": dict(threads=1, attn="eager"),
                "flush denormals, 2 threads": dict(threads=2, attn="sdpa", denormal=True),
            }
            for name, kw in variants.items():
                with settings(model=model, **kw):
                    outcome = replay_capture(out, model, contract)
                print(f"{dtype:9s} {name:28s} {summarise(outcome)}", flush=True)


if __name__ == "__main__":
    main()
