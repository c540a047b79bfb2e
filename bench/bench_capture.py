#!/usr/bin/env python
"""Benchmark zkllm_hf.capture against a plain forward, validate, and the weights fingerprint.

Runs on the real default model (SmolLM2-135M, float32, CPU, offline) under ``torch.inference_mode()``:

1. plain forward vs the same forward inside ``zkllm_hf.capture(...)`` (all layers, overwrite=True), per
   sequence length, with the capture split into forward+hooks, the exit (finish/commit) and the time spent
   in ``provenance.weights_fingerprint`` (digest cache cold vs warm);
2. ``zkllm_hf.validate(dir)`` and ``zkllm_hf.validate(dir, model=model)`` on the longest capture;
3. ``weights_fingerprint`` cold throughput vs plain single-thread ``hashlib.sha256`` over the same bytes.

Every number is the median of ``--repeats`` runs after one warm-up; min and max are shown so noise is
visible. The package is not changed: the fingerprint is timed by wrapping
``zkllm_hf.provenance.weights_fingerprint`` for the duration of the run.

    HF_HUB_OFFLINE=1 python bench/bench_capture.py [--repeats 5] [--seq-lens 128,512] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import hashlib
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf import models, provenance  # noqa: E402

TEXT = "Zero-knowledge proofs let a prover convince a verifier that an LLM ran exactly as claimed."


# ------------------------------------------------------------------------------------------------
# timing helpers


@dataclass
class Series:
    """Seconds of repeated runs of one thing."""

    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)


class FingerprintTimer:
    """Wrap ``provenance.weights_fingerprint`` so every call (capture, validate) adds to ``seconds``."""

    def __init__(self) -> None:
        self.original = provenance.weights_fingerprint
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self) -> FingerprintTimer:
        original = self.original

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        provenance.weights_fingerprint = timed
        return self

    def __exit__(self, *exc) -> None:
        provenance.weights_fingerprint = self.original

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def settle() -> None:
    gc.collect()


# ------------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> list[tuple[str, str]]:
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return [
        ("cpu", cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {usable} usable by this process"),
        ("torch", f"{torch.__version__} (intra-op threads {torch.get_num_threads()})"),
        ("transformers", transformers.__version__),
        ("zkllm_hf", zkllm_hf.__version__),
        ("python", platform.python_version()),
        ("load avg", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


# ------------------------------------------------------------------------------------------------
# the measurements


def bench_seq_len(model, tokenizer, n: int, repeats: int, root: Path, fpt: FingerprintTimer) -> dict:
    ids, prompt_len, pad_id = models.tokenize(tokenizer, TEXT, pad_to=n)
    out = root / f"capture-{n}"
    plain, cap_warm, cap_cold = Series(), Series(), Series()
    fwd_warm, exit_warm, fp_warm = Series(), Series(), Series()
    fwd_cold, exit_cold, fp_cold = Series(), Series(), Series()

    def run_plain() -> float:
        settle()
        t0 = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - t0

    def run_capture(cold: bool) -> tuple[float, float, float, float]:
        if cold:
            provenance._DIGEST_CACHE.clear()
        settle()
        fpt.take()
        t0 = time.perf_counter()
        with zkllm_hf.capture(model, out, overwrite=True, prompt_length=prompt_len, pad_token_id=pad_id):
            t1 = time.perf_counter()
            model(input_ids=ids)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        return t3 - t0, t2 - t1, t3 - t2, fpt.take()

    # warm-up: one of each (the capture also fills the digest cache)
    run_plain()
    run_capture(cold=False)
    # interleave the three kinds so drift in machine load hits them alike
    for _ in range(repeats):
        plain.add(run_plain())
        total, fwd, ex, fps = run_capture(cold=False)
        cap_warm.add(total), fwd_warm.add(fwd), exit_warm.add(ex), fp_warm.add(fps)
        total, fwd, ex, fps = run_capture(cold=True)
        cap_cold.add(total), fwd_cold.add(fwd), exit_cold.add(ex), fp_cold.add(fps)
    inodes = {(st.st_dev, st.st_ino): st.st_size for st in (p.stat() for p in out.glob("*.bin"))}
    unique = sum(inodes.values())  # alias files are hard links to their primary: counted once
    return {
        "n": n, "dir": out, "plain": plain, "cap_warm": cap_warm, "cap_cold": cap_cold,
        "fwd_warm": fwd_warm, "exit_warm": exit_warm, "fp_warm": fp_warm,
        "fwd_cold": fwd_cold, "exit_cold": exit_cold, "fp_cold": fp_cold,
        "rest_cold": Series([c - f for c, f in zip(cap_cold.values, fp_cold.values)]),
        "files": len(list(out.glob("*.bin"))), "unique_mb": unique / 1e6,
    }


def bench_validate(model, folder: Path, repeats: int, fpt: FingerprintTimer) -> dict:
    plain, with_model, with_model_cold = Series(), Series(), Series()

    def run(m, cold: bool = False) -> float:
        if cold:
            provenance._DIGEST_CACHE.clear()
        settle()
        t0 = time.perf_counter()
        report = zkllm_hf.validate(folder, model=m)
        dt = time.perf_counter() - t0
        if not report.ok:
            raise SystemExit(f"validate({folder}) failed:\n{report}")
        return dt

    run(None), run(model)  # warm-up
    fpt.take()
    for _ in range(repeats):
        plain.add(run(None))
        with_model.add(run(model))
        with_model_cold.add(run(model, cold=True))
    return {"plain": plain, "model": with_model, "model_cold": with_model_cold}


def bench_fingerprint(model, repeats: int, fingerprint: Callable) -> dict:
    state = model.state_dict()
    items = sorted((k, v) for k, v in state.items() if isinstance(v, torch.Tensor))
    nbytes = sum(v.numel() * v.element_size() for _, v in items)
    buffers = [(k, v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()) for k, v in items]

    def reference() -> str:  # the documented algorithm, one thread, plain hashlib
        lines = [f"{k}|{v.dtype}|{list(v.shape)}|{hashlib.sha256(b).hexdigest()}"
                 for (k, v), (_, b) in zip(items, buffers)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def hash_only() -> float:
        settle()
        t0 = time.perf_counter()
        for _, b in buffers:
            hashlib.sha256(b).digest()
        return time.perf_counter() - t0

    def cold(threads: int) -> float:
        provenance._DIGEST_CACHE.clear()
        settle()
        t0 = time.perf_counter()
        fingerprint(model, threads=threads)
        return time.perf_counter() - t0

    def warm() -> float:
        t0 = time.perf_counter()
        fingerprint(model)
        return time.perf_counter() - t0

    provenance._DIGEST_CACHE.clear()
    fp = fingerprint(model)
    matches = fp == reference()
    hash_only(), cold(4), cold(1), warm()  # warm-up
    s_hash, s_cold, s_cold1, s_warm = Series(), Series(), Series(), Series()
    for _ in range(repeats):
        s_hash.add(hash_only())
        s_cold.add(cold(4))
        s_cold1.add(cold(1))
        s_warm.add(warm())
    dupes = {}
    for k, v in items:
        dupes.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    shared = [names for names in dupes.values() if len(names) > 1]
    return {"bytes": nbytes, "tensors": len(items), "hash": s_hash, "cold": s_cold, "cold1": s_cold1,
            "warm": s_warm, "matches_reference": matches, "shared": shared}


def profile_capture(model, tokenizer, n: int, root: Path, top: int = 20) -> str:
    ids, _, _ = models.tokenize(tokenizer, TEXT, pad_to=n)
    prof = cProfile.Profile()
    prof.enable()
    with zkllm_hf.capture(model, root / f"profile-{n}", overwrite=True):
        model(input_ids=ids)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# report


def fmt_row(label: str, s: Series | None, ratio: str = "", note: str = "") -> str:
    if s is None:
        return f"  {label:<44} {'':>9} {'':>17} {ratio:>9}  {note}"
    spread = f"{s.lo:.3f}-{s.hi:.3f}"
    return f"  {label:<44} {s.median:>9.3f} {spread:>17} {ratio:>9}  {note}".rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up (default 5)")
    ap.add_argument("--seq-lens", default="128,512", help="comma list of padded lengths (default 128,512)")
    ap.add_argument("--tmp", default="/tmp", help="where the temporary capture folder goes (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the captures instead of deleting them")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile one capture at the longest length and print the top functions")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    try:
        seq_lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seq-lens {args.seq_lens!r}: give a comma list of integers such as 128,512")
    if not seq_lens or min(seq_lens) < 1:
        ap.error("--seq-lens needs at least one positive length")

    started = time.perf_counter()
    info = machine_info()
    t0 = time.perf_counter()
    loaded = models.load(None, dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    model, tokenizer = loaded.model, loaded.tokenizer
    cfg = model.config
    root = Path(tempfile.mkdtemp(prefix="zkllm-bench-", dir=args.tmp))
    results, validate_res, fp_res, prof_text = [], None, None, None
    try:
        with torch.inference_mode(), FingerprintTimer() as fpt:
            for n in seq_lens:
                print(f"... seq_len {n}", file=sys.stderr, flush=True)
                results.append(bench_seq_len(model, tokenizer, n, args.repeats, root, fpt))
            longest = max(results, key=lambda r: r["n"])
            print(f"... validate ({longest['n']} tokens)", file=sys.stderr, flush=True)
            validate_res = bench_validate(model, longest["dir"], args.repeats, fpt)
            print("... weights fingerprint", file=sys.stderr, flush=True)
            fp_res = bench_fingerprint(model, args.repeats, fpt.original)
            if args.profile:
                print("... profile", file=sys.stderr, flush=True)
                prof_text = profile_capture(model, tokenizer, longest["n"], root)
    finally:
        if args.keep:
            print(f"captures kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    info.append(("load avg at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    print("zkllm_hf capture benchmark")
    for k, v in info:
        print(f"  {k:<16} {v}")
    print(f"  {'model':<16} {type(model).__name__} {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{model.dtype}, {cfg._attn_implementation} attention; loaded in {load_s:.1f} s")
    print(f"  {'repeats':<16} {args.repeats} (+1 warm-up), median of each; spread = min-max")
    print()
    head = f"  {'row':<44} {'median s':>9} {'spread s':>17} {'ratio':>9}  note"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in results:
        n, p = r["n"], r["plain"].median
        print(f"  [seq_len {n}: {r['files']} .bin files, {r['unique_mb']:.0f} MB written per capture]")
        print(fmt_row("plain forward", r["plain"], "1.00x"))
        print(fmt_row("capture, digest cache warm", r["cap_warm"], f"{r['cap_warm'].median / p:.2f}x",
                      "capture / plain"))
        print(fmt_row("  forward with hooks", r["fwd_warm"], f"{r['fwd_warm'].median / p:.2f}x",
                      "quantize + identity checks + queue writes"))
        print(fmt_row("  exit (finish + commit)", r["exit_warm"], "",
                      "writes drain, manifest, schema, re-hash, rename"))
        print(fmt_row("    of which weights fingerprint", r["fp_warm"], "", "cached digests"))
        print(fmt_row("capture, digest cache cold", r["cap_cold"], f"{r['cap_cold'].median / p:.2f}x",
                      "capture / plain"))
        print(fmt_row("  exit (finish + commit)", r["exit_cold"]))
        print(fmt_row("    of which weights fingerprint", r["fp_cold"],
                      f"{r['fp_cold'].median / r['cap_cold'].median:.0%}", "share of cold capture"))
        print(fmt_row("  rest (capture - fingerprint)", r["rest_cold"], f"{r['rest_cold'].median / p:.2f}x",
                      "rest / plain"))
    if validate_res is not None:
        v = validate_res
        print(f"  [validate, {longest['n']}-token capture]")
        print(fmt_row("validate(dir)", v["plain"], "1.00x"))
        print(fmt_row("validate(dir, model=model), digests cached", v["model"],
                      f"{v['model'].median / v['plain'].median:.2f}x", "+ RMSNorm recompute + fingerprint"))
        print(fmt_row("validate(dir, model=model), digests cold", v["model_cold"],
                      f"{v['model_cold'].median / v['plain'].median:.2f}x"))
    if fp_res is not None:
        f = fp_res
        mb = f["bytes"] / 1e6
        h = mb / f["hash"].median
        print(f"  [weights fingerprint: {f['tensors']} tensors, {mb:.0f} MB state dict; "
              f"matches reference: {f['matches_reference']}]")
        print(fmt_row("hashlib.sha256, 1 thread, same bytes", f["hash"], "1.00x", f"{h:,.0f} MB/s"))
        print(fmt_row("weights_fingerprint cold (threads=4)", f["cold"],
                      f"{mb / f['cold'].median / h:.2f}x", f"{mb / f['cold'].median:,.0f} MB/s"))
        print(fmt_row("weights_fingerprint cold (threads=1)", f["cold1"],
                      f"{mb / f['cold1'].median / h:.2f}x", f"{mb / f['cold1'].median:,.0f} MB/s"))
        print(fmt_row("weights_fingerprint cached", f["warm"], "", ""))
        if f["shared"]:
            shared = ", ".join(" = ".join(names) for names in f["shared"])
            print(f"  note: tied tensors hashed more than once: {shared}")
    print(f"\n  total benchmark time {time.perf_counter() - started:.0f} s")
    if prof_text:
        print("\ncProfile of one capture (digest cache warm), top functions by own time:")
        print(prof_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
