"""The layer checks, float64 formula (the reference) against the fast path, per check: medians, on the CPU.

    python bench/bench_checks.py [--repeats 21] [--rows 2048] [--cols 576] [--capture DIR] [--json FILE]

On one synthetic (rows x cols) layer shaped like SmolLM2's (float32 sums of a residual stream with two
outlier dimensions near 22,500, quantised at 2**16): skip (the ``sum`` check), chain (``exact``), the exact-int
sum, drift, and the RMSNorm (the float64 formula against fast_norm's lean kernel). With ``--norms``, the norm
alone at 512 and 2048 rows, float32 and bfloat16 layers, on 1 and on 2 threads. With ``--capture DIR`` (a finished
capture, e.g. of SmolLM2 at 2048 tokens), also the contract's layer checks on every layer in it, from the
files, as validate and the gate run them (``run_identities``; the norm checks are skipped: no model). Each
pair is first checked to give the same four numbers. Reports wall-clock and process CPU medians in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from zkllm_hf import fast_checks as fast
from zkllm_hf import fast_norm
from zkllm_hf import fixed_point as fp
from zkllm_hf.contracts import load_contract, run_identities


def timed(fn, repeats: int) -> dict[str, float]:
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"wall_ms": statistics.median(wall) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3}


def synthetic_layer(rows: int, cols: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g) * 2
    x[:, 7] = 22_500 + x[:, 7] * 50  # SmolLM2's residual stream has dimensions this large
    x[:, 300 % cols] = -9_000 + x[:, 300 % cols] * 20
    y = torch.randn(rows, cols, generator=g)
    s = x + y  # float32 add: rounds to half an ulp of the sum
    q = {name: fp.quantize(t, 16) for name, t in (("x", x), ("y", y), ("s", s))}
    q["w"] = torch.rand(cols, generator=g) + 0.5
    q["n"] = fp.quantize(torch.nn.functional.rms_norm(x, (cols,), q["w"], 1e-5), 16)
    return q


def pairs(q: dict[str, torch.Tensor]) -> dict[str, tuple]:
    x, y, s, f32 = q["x"], q["y"], q["s"], torch.float32
    exact_sum = q["x"] + q["y"]  # as residuals="exact-int" derives it
    return {
        "skip (sum)": (
            lambda: fp.sum_deviation_stats(x, y, s, f32, 16),
            lambda: fast.sum_stats(x, y, s, f32, 16),
        ),
        "chain (exact)": (
            lambda: fp.equal_deviation_stats(s, s),
            lambda: fast.equal_stats(s, [s], dense=lambda: fp.equal_deviation_stats(s, s)),
        ),
        "exact-int sum": (
            lambda: fp.equal_deviation_stats(exact_sum, x.to(torch.int64) + y.to(torch.int64)),
            lambda: fast.equal_stats(exact_sum, [x, y], dense=None),
        ),
        "drift": (
            lambda: fp.drift_deviation_stats(exact_sum, s, f32, 16, drift_lsb=256, drift_ulps=4),
            lambda: fast.drift_stats(exact_sum, s, f32, 16, drift_lsb=256, drift_ulps=4),
        ),
        "rmsnorm": (
            lambda: fp.rmsnorm_deviation_stats(x, q["n"], q["w"], 1e-5, f32, f32, 16),
            lambda: fast_norm.rmsnorm_stats(x, q["n"], q["w"], 1e-5, f32, f32, 16),
        ),
    }


def norm_layer(rows: int, cols: int, dtype: torch.dtype) -> tuple:
    """A layer's input norm in ``dtype`` as LlamaRMSNorm computes it (float32 inside), quantised at 2**16."""
    q = synthetic_layer(rows, cols)
    x = (q["x"].double() / 2**16).to(dtype)
    w = q["w"].to(dtype)
    xf = x.float()
    y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    return fp.quantize(x, 16), fp.quantize(y, 16), w, 1e-5, dtype, dtype, 16


def bench_norms(repeats: int) -> list[dict]:
    """The norm check, formula against lean kernel, per (dtype, rows, threads); the same numbers first."""
    out, threads = [], torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (512, 2048):
                args = norm_layer(rows, 576, dtype)
                assert fast_norm.rmsnorm_stats(*args).tolist() == fp.rmsnorm_deviation_stats(*args).tolist()
                for n in (1, 2):
                    torch.set_num_threads(n)
                    ref = timed(lambda a=args: fp.rmsnorm_deviation_stats(*a), repeats)
                    new = timed(lambda a=args: fast_norm.rmsnorm_stats(*a), repeats)
                    out.append({"dtype": str(dtype).removeprefix("torch."), "rows": rows, "threads": n,
                                "reference": ref, "fast": new})
    finally:
        torch.set_num_threads(threads)
    return out


def capture_layers(folder: Path):
    """(layer, codes per point, previous layer's codes) of every layer in a finished unit, from its files."""
    from zkllm_hf import load_capture
    from zkllm_hf.points import POINTS

    cap = load_capture(folder)
    by_layer = {
        layer: {p.name: torch.from_numpy(np.array(cap.codes(layer, p.name))) for p in POINTS} for layer in cap.layers
    }
    names = {p.name for p in POINTS}
    prev = None
    for layer in sorted(by_layer):
        tensors = {k: v for k, v in by_layer[layer].items() if k in names}
        yield layer, tensors, (prev if prev is not None and prev[0] == layer - 1 else (None, None))[1]
        prev = (layer, tensors)


def bench_capture(folder: Path, repeats: int) -> dict:
    contract = load_contract("v1")
    layers = list(capture_layers(folder))
    dtypes = {p: torch.float32 for p in layers[0][1]}

    def run(identities):
        out = []
        for layer, tensors, prev in layers:
            previous = None if prev is None else {"block_output": prev["block_output"]}
            out.append(identities(contract, layer, tensors, dtypes, 16, previous=previous, norms="no model"))
        return out

    def reference(contract, layer, tensors, dtypes, k, previous, norms):
        """The same checks through the float64 formulas."""
        out = [fp.sum_deviation_stats(tensors["block_input"], tensors["attn_output"], tensors["post_attn_residual"],
                                      torch.float32, k),
               fp.sum_deviation_stats(tensors["post_attn_residual"], tensors["mlp_output"], tensors["block_output"],
                                      torch.float32, k)]
        if previous is not None:
            out.append(fp.equal_deviation_stats(tensors["block_input"], previous["block_output"]))
        return out

    new = run(run_identities)
    ref = run(reference)
    for results, stats in zip(new, ref):
        got = [(r.max_dev_lsb, r.max_ratio) for r in results if r.skipped is None]
        want = [(s[0], s[1]) for s in (t.tolist() for t in stats)]
        assert got == want, (got, want)
    return {
        "layers": len(layers),
        "shape": list(layers[0][1]["block_input"].shape),
        "reference": timed(lambda: run(reference), repeats),
        "fast": timed(lambda: run(run_identities), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--capture", type=Path, help="a finished capture folder: time its layer checks too")
    ap.add_argument("--norms", action="store_true", help="the norm check alone: 512/2048 rows, f32/bf16, 1/2 threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    report: dict = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
                    "shape": [args.rows, args.cols], "checks": {}}
    q = synthetic_layer(args.rows, args.cols)
    for name, (ref, new) in pairs(q).items():
        entry = {"reference": timed(ref, args.repeats)}
        if new is not None:
            assert new().tolist() == ref().tolist(), name
            entry["fast"] = timed(new, args.repeats)
        report["checks"][name] = entry
    if args.capture:
        report["capture"] = bench_capture(args.capture, max(3, args.repeats // 4))
    if args.norms:
        report["norms"] = bench_norms(args.repeats)
    report["machine"]["load_avg_end"] = os.getloadavg()
    m = report["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), load "
          f"{m['load_avg'][0]:.2f} -> {m['load_avg_end'][0]:.2f}; {args.rows} x {args.cols} int32")
    print(f"{'check':32s} {'reference ms':>14s} {'fast ms':>10s}   (wall; process CPU in brackets)")
    rows = list(report["checks"].items())
    if "capture" in report:
        c = report["capture"]
        rows.append((f"capture: {c['layers']} layers {c['shape']}", c))
    for name, e in rows:
        r, f = e["reference"], e.get("fast")
        fast_txt = f"{f['wall_ms']:10.2f} ({f['cpu_ms']:.2f})" if f else f"{'-':>10s}"
        print(f"{name:32s} {r['wall_ms']:8.2f} ({r['cpu_ms']:.2f}) {fast_txt}")
    for e in report.get("norms", []):
        r, f = e["reference"], e["fast"]
        print(f"rmsnorm {e['dtype']:8s} {e['rows']:5d} rows, {e['threads']} thr  "
              f"{r['wall_ms']:8.2f} ({r['cpu_ms']:.2f})"
              f" {f['wall_ms']:10.2f} ({f['cpu_ms']:.2f})   CPU {r['cpu_ms'] / f['cpu_ms']:.2f}x less")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
