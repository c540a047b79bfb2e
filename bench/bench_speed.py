#!/usr/bin/env python
"""Capture at the speed of the disk (issues 10 and 17): capture vs a plain forward, the peers doing the same
job, and the raw write of the same bytes.

For each model and sequence length, in one process, one warm-up each, then ``--repeats`` rounds with the
order rotated each round and ``os.sync()`` before every run; medians:

  plain      ``model(input_ids=ids)``, no hooks;
  capture    the whole ``with zkllm_hf.capture(model, dir, overwrite=True): model(ids)`` block;
  floor      the capture's own int32 arrays (7 per layer) written with ``ndarray.tofile``, no hash;
  hooks      hand-written hooks that clone every point, then ``np.round(x * 2**16).astype(int32).tofile()``;
  nnsight, torchlens   the same job through each (``bench/peers.py``; run when installed: the bench extra).

The target is ``capture / (plain + floor)``; each peer's files are compared with the capture's, bit for bit.

Then, in fresh subprocesses, the peak RSS a capture adds over a plain forward (RSS sampled every 2 ms
during the call, after the same warm-up in both), and validate's throughput: ``validate(dir, model=model)`` on
the longest capture, and on a synthetic 7B-shaped capture (``bench/synthetic.py``: 32 layers x 2048 x 4096,
7.5 GB) with its peak RSS. ``--profile`` adds a cProfile of one capture (main thread).

    HF_HUB_OFFLINE=1 python bench/bench_speed.py                      # everything, about 15 min on 2 cores
    python bench/bench_speed.py --models tiny --seq-lens 128,512 --no-rss --synthetic-layers 0   # quick
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf import models  # noqa: E402
from zkllm_hf.points import POINTS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

HERE = Path(__file__).resolve().parent
TEXT = "Zero-knowledge proofs let a prover convince a verifier that an LLM ran exactly as claimed."


# ------------------------------------------------------------------------------------------------
# models


def load_model(name: str):
    """``default``: SmolLM2-135M (30 layers, hidden 576); ``tiny``: a random Llama of the same width with 4
    layers (same per-layer sizes, another depth). Returns (model, ids maker)."""
    if name == "default":
        loaded = models.load(None, dtype="float32", device="cpu")
        model, tok = loaded.model, loaded.tokenizer
        return model, lambda n: models.tokenize(tok, TEXT, pad_to=n)[0]
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=4,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=4096,
        )
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(20)
        return model, lambda n: torch.randint(0, 512, (1, n), generator=torch.Generator().manual_seed(n))
    raise SystemExit(f"unknown model {name!r}: default or tiny")


def activation_bytes(model, n: int) -> int:
    """One layer of activations: 7 points x seq_len x hidden x 4 bytes."""
    return len(POINTS) * n * model.config.hidden_size * 4


# ------------------------------------------------------------------------------------------------
# the four ways


def run_plain(model, ids) -> None:
    model(input_ids=ids)


def run_capture(model, ids, out: Path) -> None:
    with zkllm_hf.capture(model, out, overwrite=True):
        model(input_ids=ids)


def floor_arrays(out: Path) -> list[np.ndarray]:
    """The capture's int32 files (primaries only: an alias is a hard link), in memory."""
    cap = zkllm_hf.load_capture(out)
    return [np.array(cap.codes(layer, p.name)) for layer in cap.layers for p in POINTS]


def run_floor(arrays: list[np.ndarray], out: Path) -> None:
    """The raw write of the same bytes: ``ndarray.tofile``, no hash, no sync (the target's denominator)."""
    out.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        a.tofile(out / f"f{i}.bin")


def timed(fn, *args) -> tuple[float, float]:
    gc.collect()
    os.sync()  # no run pays for the previous one's dirty pages
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w, time.process_time() - c


def bench_size(model, make_ids, n: int, repeats: int, root: Path, only_peers: set[str] | None = None) -> dict:
    """Every way at one length: one warm-up each, then ``repeats`` rounds, the order rotated each round."""
    ids = make_ids(n)
    out, floor_dir = root / f"cap-{n}", root / f"floor-{n}"
    run_plain(model, ids), run_capture(model, ids, out)  # warm-up
    arrays = floor_arrays(out)
    ways = {"plain": (run_plain, model, ids), "capture": (run_capture, model, ids, out)}
    ways["floor"] = (run_floor, arrays, floor_dir)
    same = {}
    for peer in peers.available(model):
        if only_peers is not None and peer.name not in only_peers:
            continue
        folder = root / f"{peer.name}-{n}"
        ways[peer.name] = (peer.run, ids, folder)
        peer.run(ids, folder)  # warm-up, and its files compared with the capture's
        same[peer.name] = peers.same_files(folder, out, model.config.num_hidden_layers)
    run_floor(arrays, floor_dir)
    names = list(ways)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            fn, *args = ways[k]
            rows[k].append(timed(fn, *args))
    med = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
    spread = {k: (min(w for w, _ in v), max(w for w, _ in v)) for k, v in rows.items()}
    nbytes = sum(a.nbytes for a in arrays)
    for k in names:
        if k not in ("plain", "capture"):
            shutil.rmtree(root / f"{k}-{n}", ignore_errors=True)
    return {
        "seq_len": n,
        "bytes": nbytes,
        "median": med,
        "cpu": cpu,
        "spread": spread,
        "same_bytes": same,
        "dir": str(out),
        "target": med["capture"] / (med["plain"] + med["floor"]),  # issue 17: <= 1.25
        "over_plain": {k: med[k] / med["plain"] for k in names},
        "capture_mb_s": nbytes / 1e6 / med["capture"],
        "floor_mb_s": nbytes / 1e6 / med["floor"],
        "layer_bytes": activation_bytes(model, n),
    }


# ------------------------------------------------------------------------------------------------
# peak RSS, in subprocesses


class RssSampler:
    """Peak RSS of this process while the block runs, sampled every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.start = 0

    def __enter__(self) -> RssSampler:
        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added(self) -> int:
        return self.peak - self.start


def rss_child(model_name: str, n: int, mode: str, out: str) -> None:
    """Run in a subprocess: load, warm up (a plain forward at this length, and a 16-token capture, so that the
    libraries a capture imports once, pandas, pyarrow and pandera, are loaded in both), then ``mode`` once
    under the sampler."""
    model, make_ids = load_model(model_name)
    ids = make_ids(n)
    with torch.inference_mode():
        run_plain(model, ids)
        run_capture(model, ids[:, :16], Path(out + "-warm-up"))
        with RssSampler() as s:
            run_plain(model, ids) if mode == "plain" else run_capture(model, ids, Path(out))
    print(json.dumps({"added": s.added, "start": s.start, "peak": s.peak}))


def measure_rss(model_name: str, n: int, root: Path) -> dict:
    got = {}
    for mode in ("plain", "capture"):
        cmd = [sys.executable, __file__, "--rss-child", model_name, str(n), mode, str(root / f"rss-{model_name}-{n}")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        got[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "plain_added": got["plain"]["added"],
        "capture_added": got["capture"]["added"],
        "added_over_plain": got["capture"]["added"] - got["plain"]["added"],
    }


# ------------------------------------------------------------------------------------------------
# validate


def bench_validate(model, folder: str, repeats: int) -> dict:
    nbytes = sum(
        p.stat().st_size for p in Path(folder).glob("*.bin") if p.stat().st_nlink == 1 or "block-input" not in p.name
    )
    times = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        report = zkllm_hf.validate(folder, model=model)
        times.append(time.perf_counter() - t)
        if not report.ok:
            raise SystemExit(f"validate({folder}) failed:\n{report}")
    med = statistics.median(times)
    return {"seconds": med, "bytes": nbytes, "mb_s": nbytes / 1e6 / med}


def synthetic_child(folder: str, layers: int, n: int, hidden: int) -> None:
    """Run in a subprocess: write the synthetic capture, then validate it with the model, RSS sampled."""
    sys.path.insert(0, str(HERE))
    import synthetic

    model, capture_s = synthetic.write_capture(folder, layers=layers, seq_len=n, hidden=hidden)
    nbytes = 7 * layers * n * hidden * 4
    with RssSampler() as s:
        t = time.perf_counter()
        report = zkllm_hf.validate(folder, model=model)
        seconds = time.perf_counter() - t
    print(
        json.dumps(
            {
                "ok": report.ok,
                "checks": report.summary(),
                "capture_s": capture_s,
                "validate_s": seconds,
                "bytes": nbytes,
                "mb_s": nbytes / 1e6 / seconds,
                "capture_mb_s": nbytes / 1e6 / capture_s,
                "validate_added_rss": s.added,
                "layer_bytes": 7 * n * hidden * 4,
            }
        )
    )


def profile_capture(model, ids, out: Path, top: int = 15) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run_capture(model, ids, out)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        with torch.inference_mode():
            rss_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--synthetic-child":
        with torch.inference_mode():
            synthetic_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="default,tiny")
    ap.add_argument("--seq-lens", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurements")
    ap.add_argument("--synthetic-layers", type=int, default=32, help="layers of the 7B-shaped capture (0: skip)")
    ap.add_argument("--profile", action="store_true", help="cProfile one capture at the longest length")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    ap.add_argument("--peers", help="only these peers (hooks,nnsight,torchlens); default: all installed")
    args = ap.parse_args(argv)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    only = set(args.peers.split(",")) if args.peers else None
    root = Path(tempfile.mkdtemp(prefix="zkllm-speed-", dir=args.tmp))
    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_avg_start": os.getloadavg(),
        },
        "models": {},
    }
    try:
        for name in args.models.split(","):
            model, make_ids = load_model(name)
            entry = report["models"][name] = {
                "layers": model.config.num_hidden_layers,
                "hidden": model.config.hidden_size,
                "sizes": [],
            }
            for n in seq_lens:
                print(f"... {name} seq_len {n}", file=sys.stderr, flush=True)
                with torch.inference_mode():
                    r = bench_size(model, make_ids, n, args.repeats, root / name, only)
                if not args.no_rss:
                    r["rss"] = measure_rss(name, n, root)
                entry["sizes"].append(r)
            with torch.inference_mode():
                longest = entry["sizes"][-1]
                print(f"... {name} validate", file=sys.stderr, flush=True)
                entry["validate"] = bench_validate(model, longest["dir"], args.repeats)
                if args.profile and name == "default":
                    entry["profile"] = profile_capture(model, make_ids(max(seq_lens)), root / "profile")
            del model
            gc.collect()
        if args.synthetic_layers:
            print(f"... synthetic 7B-shaped capture, {args.synthetic_layers} layers", file=sys.stderr, flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--synthetic-child",
                str(root / "synthetic"),
                str(args.synthetic_layers),
                "2048",
                "4096",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            report["synthetic"] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["machine"]["load_avg_end"] = os.getloadavg()
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def print_report(rep: dict) -> None:
    m = rep["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); load avg "
        f"{' '.join(f'{x:.2f}' for x in m['load_avg_start'])} -> {' '.join(f'{x:.2f}' for x in m['load_avg_end'])}"
    )
    print("seconds are medians (wall); ratios of medians; MB/s = unique bytes written / median")
    for name, e in rep["models"].items():
        for r in e["sizes"]:
            med, rss = r["median"], r.get("rss")
            ways = "  ".join(f"{k} {v:.3f}s ({r['over_plain'][k]:.2f}x)" for k, v in med.items())
            print(f"{name} seq {r['seq_len']} ({r['bytes'] / 1e6:.0f} MB): {ways}")
            print(
                f"    capture / (plain + raw tofile) = {r['target']:.2f}; capture {r['capture_mb_s']:.0f} MB/s; "
                f"peers' files equal zkllm-hf's: {r['same_bytes']}"
            )
            if rss:
                print(
                    f"    added peak RSS over plain: {rss['added_over_plain'] / 1e6:.1f} MB "
                    f"({rss['added_over_plain'] / r['layer_bytes']:.2f} layers)"
                )
        v = e["validate"]
        print(
            f"{name:<8} validate(dir, model=model) on the longest capture: {v['seconds']:.3f} s, {v['mb_s']:.0f} MB/s"
        )
    s = rep.get("synthetic")
    if s:
        print(
            f"synthetic 7B-shaped ({s['bytes'] / 1e9:.2f} GB): capture {s['capture_s']:.1f} s "
            f"({s['capture_mb_s']:.0f} MB/s); validate with the model {s['validate_s']:.1f} s ({s['mb_s']:.0f} MB/s), "
            f"ok={s['ok']}, added peak RSS {s['validate_added_rss'] / 1e6:.0f} MB "
            f"({s['validate_added_rss'] / s['layer_bytes']:.2f} layers)"
        )
    for name, e in rep["models"].items():
        if "profile" in e:
            print(f"\ncProfile of one capture ({name}, main thread):\n{e['profile']}")


if __name__ == "__main__":
    sys.exit(main())
