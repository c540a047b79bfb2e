#!/usr/bin/env python
"""Benchmark zkllm_hf.capture against a plain forward, validate, and the weights fingerprint.

Runs on the real default model (SmolLM2-135M, float32, CPU, offline) under ``torch.inference_mode()``:

1. plain forward vs the same forward inside ``zkllm_hf.capture(...)`` (all layers, overwrite=True), per
   sequence length, with the capture split into forward with hooks, the exit (finish/commit) and the time
   spent in ``provenance.weights_fingerprint``;
2. ``zkllm_hf.validate(dir, model=model)`` on the longest capture;
3. ``weights_fingerprint`` (default threads and threads=1) vs plain single-thread ``hashlib.sha256`` over
   the same bytes.

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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf import models, provenance  # noqa: E402

TEXT = "Zero-knowledge proofs let a prover convince a verifier that an LLM ran exactly as claimed."
DEFAULT_FP_THREADS = min(8, os.cpu_count() or 1)  # what weights_fingerprint(threads=None) uses


# ------------------------------------------------------------------------------------------------
# timing helpers


@dataclass
class Series:
    """Seconds of repeated runs of one thing."""

    values: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # process CPU seconds (all threads), where measured

    def add(self, v: float | tuple[float, float]) -> None:
        if isinstance(v, tuple):
            v, c = v
            self.cpu.append(c)
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


class Clock:
    """Wall and process-CPU time of a block (after a gc.collect()): ``with Clock() as c: ...; c.both``."""

    def __enter__(self) -> Clock:
        gc.collect()
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.both = (time.perf_counter() - self._w, time.process_time() - self._c)


class FingerprintTimer:
    """Wrap ``provenance.weights_fingerprint`` so every call (capture, validate) adds to ``seconds``."""

    def __init__(self) -> None:
        self.original = provenance.weights_fingerprint
        self.seconds = 0.0

    def __enter__(self) -> FingerprintTimer:
        original = self.original

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        provenance.weights_fingerprint = timed
        return self

    def __exit__(self, *exc) -> None:
        provenance.weights_fingerprint = self.original

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


# ------------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, plus the flags that matter here (SHA-256 and vector units)."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    shown = [f for f in ("sha_ni", "avx2", "avx512f", "amx_tile") if f in flags]
    return f"{name} (flags: {' '.join(shown) or 'none of sha_ni/avx2/avx512f'})" if flags else name


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
    r = {k: Series() for k in ("plain", "capture", "fwd", "exit", "fp")}

    def run_plain() -> tuple[float, float]:
        with Clock() as c:
            model(input_ids=ids)
        return c.both

    def run_capture() -> tuple[tuple[float, float], float, float, float]:
        fpt.take()
        with Clock() as c:
            with zkllm_hf.capture(model, out, overwrite=True, prompt_length=prompt_len, pad_token_id=pad_id):
                t1 = time.perf_counter()
                model(input_ids=ids)
                t2 = time.perf_counter()
        return c.both, t2 - t1, time.perf_counter() - t2, fpt.take()

    run_plain(), run_capture()  # warm-up
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        r["plain"].add(run_plain())
        for k, v in zip(("capture", "fwd", "exit", "fp"), run_capture()):
            r[k].add(v)
    inodes = {(st.st_dev, st.st_ino): st.st_size for st in (p.stat() for p in out.glob("*.bin"))}
    # alias files are hard links to their primary: counted once
    return {**r, "n": n, "dir": out, "files": len(list(out.glob("*.bin"))), "unique_mb": sum(inodes.values()) / 1e6}


def bench_validate(model, folder: Path, repeats: int, fpt: FingerprintTimer) -> dict:
    total, fp = Series(), Series()

    def run() -> tuple[float, float]:
        with Clock() as c:
            report = zkllm_hf.validate(folder, model=model)
        if not report.ok:
            raise SystemExit(f"validate({folder}) failed:\n{report}")
        return c.both

    run()  # warm-up
    for _ in range(repeats):
        fpt.take()
        total.add(run())
        fp.add(fpt.take())
    return {"total": total, "fp": fp}


def bench_fingerprint(model, repeats: int, fingerprint) -> dict:
    def ident(v: torch.Tensor) -> tuple:
        return v.data_ptr(), tuple(v.shape), v.stride(), v.dtype

    items = sorted((k, v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    distinct: dict[tuple, torch.Tensor] = {}  # tied weights once, as weights_fingerprint does
    for _, v in items:
        distinct.setdefault(ident(v), v)
    buffers = [v.detach().contiguous().reshape(-1).view(torch.uint8).numpy() for v in distinct.values()]
    nbytes = sum(b.nbytes for b in buffers)

    # the documented algorithm, one thread, plain hashlib
    digests = {key: hashlib.sha256(b).hexdigest() for key, b in zip(distinct, buffers)}
    lines = [f"{k}|{v.dtype}|{list(v.shape)}|{digests[ident(v)]}" for k, v in items]
    matches = fingerprint(model) == hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def hash_only() -> tuple[float, float]:
        with Clock() as c:
            for b in buffers:
                hashlib.sha256(b).digest()
        return c.both

    def package(threads: int | None) -> tuple[float, float]:
        with Clock() as c:
            fingerprint(model, threads=threads)
        return c.both

    hash_only(), package(None), package(1)  # warm-up
    s_hash, s_default, s_one = Series(), Series(), Series()
    for _ in range(repeats):
        s_hash.add(hash_only())
        s_default.add(package(None))
        s_one.add(package(1))
    names: dict[tuple, list[str]] = {}
    for k, v in items:
        names.setdefault(ident(v), []).append(k)
    shared = [" = ".join(group) for group in names.values() if len(group) > 1]
    return {"bytes": nbytes, "tensors": len(items), "distinct": len(distinct), "hash": s_hash,
            "default": s_default, "one": s_one, "matches_reference": matches, "shared": shared}


def profile_capture(model, tokenizer, n: int, root: Path, top: int = 20) -> str:
    ids, _, _ = models.tokenize(tokenizer, TEXT, pad_to=n)
    prof = cProfile.Profile()
    prof.enable()
    with zkllm_hf.capture(model, root / f"profile-{n}", overwrite=True):
        model(input_ids=ids)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write("-- zkllm_hf functions by cumulative time --\n")
    stats.sort_stats("cumulative").print_stats(r"zkllm_hf/", top)
    buf.write("-- everything by own time --\n")
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# report


def fmt_row(label: str, s: Series, base: Series | None = None, note: str = "", *, throughput: bool = False) -> str:
    """One table row; with ``base``, the ratios median/median and min/min against it (inverted, base/s,
    when ``throughput``: then the ratio compares speeds)."""
    ratio = ratio_min = ""
    if base is not None:
        r, rm = s.median / base.median, s.lo / base.lo
        if throughput:
            r, rm = 1 / r, 1 / rm
        ratio, ratio_min = f"{r:.2f}x", f"{rm:.2f}x"
    cpu = f"{statistics.median(s.cpu):.3f}" if s.cpu else ""
    return (f"  {label:<42} {s.median:>8.3f} {s.lo:>7.3f} {s.hi:>7.3f} {cpu:>7} {ratio:>7} {ratio_min:>7}  "
            f"{note}").rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row, after one warm-up (default 5)")
    ap.add_argument("--seq-lens", default="128,512", help="comma list of padded lengths (default 128,512)")
    ap.add_argument("--tmp", default="/tmp", help="where the temporary capture folder goes (default /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the captures instead of deleting them")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own choice, usually one per core)")
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
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    info = machine_info()
    t0 = time.perf_counter()
    loaded = models.load(None, dtype="float32", device="cpu")
    load_s = time.perf_counter() - t0
    model, tokenizer = loaded.model, loaded.tokenizer
    cfg = model.config
    prompt_tokens = int(models.tokenize(tokenizer, TEXT)[1])
    if min(seq_lens) < prompt_tokens:
        ap.error(f"--seq-lens: the benchmark sentence is {prompt_tokens} tokens; use lengths >= {prompt_tokens}")
    root = Path(tempfile.mkdtemp(prefix="zkllm-bench-", dir=args.tmp))
    results, prof_text = [], None
    try:
        with torch.inference_mode(), FingerprintTimer() as fpt:
            for n in seq_lens:
                print(f"... seq_len {n}", file=sys.stderr, flush=True)
                results.append(bench_seq_len(model, tokenizer, n, args.repeats, root, fpt))
            longest = max(results, key=lambda r: r["n"])
            print(f"... validate ({longest['n']} tokens)", file=sys.stderr, flush=True)
            v = bench_validate(model, longest["dir"], args.repeats, fpt)
            print("... weights fingerprint", file=sys.stderr, flush=True)
            f = bench_fingerprint(model, args.repeats, fpt.original)
            if args.profile:
                print("... profile", file=sys.stderr, flush=True)
                prof_text = profile_capture(model, tokenizer, longest["n"], root)
    finally:
        if args.keep:
            print(f"captures kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    info.append(("load avg at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    main_rows = [r[k] for r in results for k in ("plain", "capture")] + [v["total"], f["hash"], f["default"], f["one"]]
    noisy = sum(s.hi > 1.5 * s.lo for s in main_rows)
    print("zkllm_hf capture benchmark")
    for k, val in info:
        print(f"  {k:<16} {val}")
    print(f"  {'model':<16} {type(model).__name__} {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{model.dtype}, {cfg._attn_implementation} attention; loaded in {load_s:.1f} s")
    print(f"  {'repeats':<16} {args.repeats} (+1 warm-up). Seconds: wall-clock median, min, max; cpu = median "
          f"process CPU seconds (all threads).")
    print(f"  {'':<16} ratio = median / median of the row's baseline, r(min) = min / min (less noise-prone)")
    print()
    head = f"  {'row':<42} {'median':>8} {'min':>7} {'max':>7} {'cpu':>7} {'ratio':>7} {'r(min)':>7}  note"
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in results:
        p = r["plain"]
        share = r["fp"].median / r["capture"].median
        print(f"  [seq_len {r['n']}: {r['files']} .bin files, {r['unique_mb']:.0f} MB written per capture; "
              f"ratios vs plain forward]")
        print(fmt_row("plain forward", p, p))
        print(fmt_row("capture", r["capture"], p, "whole with-block"))
        print(fmt_row("  forward with hooks", r["fwd"], p, "quantize, identity checks, queue writes"))
        print(fmt_row("  exit (finish + commit)", r["exit"], None, "drain writes, manifest, schema, re-hash"))
        print(fmt_row("    of which weights fingerprint", r["fp"], None, f"{share:.0%} of capture"))
    print(f"  [validate, {longest['n']}-token capture]")
    print(fmt_row("validate(dir, model=model)", v["total"], None,
                  "files, schema, sha256, range, sums, chain, RMSNorm recompute, fingerprint"))
    print(fmt_row("  of which weights fingerprint", v["fp"], None,
                  f"{v['fp'].median / v['total'].median:.0%} of validate"))
    mb = f["bytes"] / 1e6
    print(f"  [weights fingerprint: {f['tensors']} tensors ({f['distinct']} distinct), {mb:.0f} MB hashed; result "
          f"matches a plain-hashlib reference: {f['matches_reference']}; ratios are throughput vs hashlib]")
    for label, ser in (("hashlib.sha256, 1 thread, same bytes", f["hash"]),
                       (f"weights_fingerprint, threads={DEFAULT_FP_THREADS} (default)", f["default"]),
                       ("weights_fingerprint, threads=1", f["one"])):
        print(fmt_row(label, ser, f["hash"], f"{mb / ser.median:,.0f} MB/s (median), "
                      f"{mb / ser.lo:,.0f} MB/s (best)", throughput=True))
    if f["shared"]:
        print(f"  note: tied tensors, hashed once: {', '.join(f['shared'])}")
    if noisy:
        print(f"  WARNING: {noisy} of {len(main_rows)} rows have max > 1.5 x min: something else used the CPUs "
              f"during the run\n  (see load avg). Trust r(min) more than the medians, or rerun on an idle machine.")
    print(f"\n  total benchmark time {time.perf_counter() - started:.0f} s")
    if prof_text:
        print(f"\ncProfile of one {longest['n']}-token capture:")
        print(prof_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
