#!/usr/bin/env python
"""Capture at the speed of the disk (issue 10): capture vs a plain forward, a naive capture and the raw floor.

For each model and sequence length, in one process, interleaved (a, b, c, d, a, b, ...), medians of
``--repeats`` runs after one warm-up:

  (a) plain    ``model(input_ids=ids)``, no hooks;
  (b) capture  the whole ``with zkllm_hf.capture(model, dir, overwrite=True): model(ids)`` block;
  (c) naive    hooks that clone every point, then ``np.round(x * 2**16).astype(int32).tofile()`` per file;
  (d) floor    the capture's own int32 arrays (7 per layer) written with ``ndarray.tofile`` and hashed with
               sha256: what writing the bytes costs at the least.

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
import hashlib
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


class NaiveCapture:
    """Hooks that clone the seven points of every layer, then quantise and write each with numpy."""

    def __init__(self, model):
        self.model = model
        self.saved: list[tuple[str, torch.Tensor]] = []

    def run(self, ids, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.saved = []
        handles = []

        def keep(name):
            def hook(module, args, output=None):
                t = output if output is not None else args[0]
                t = t[0] if isinstance(t, tuple) else t
                self.saved.append((name, t.detach().clone()))

            return hook

        for i, layer in enumerate(self.model.model.layers):
            handles += [
                layer.register_forward_pre_hook(lambda m, a, i=i: keep(f"{i}-block-input")(m, a)),
                layer.input_layernorm.register_forward_hook(keep(f"{i}-norm-in")),
                layer.self_attn.register_forward_hook(keep(f"{i}-attn")),
                layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: keep(f"{i}-resid")(m, a)),
                layer.post_attention_layernorm.register_forward_hook(keep(f"{i}-ffn-in")),
                layer.mlp.register_forward_hook(keep(f"{i}-mlp")),
                layer.register_forward_hook(keep(f"{i}-block-output")),
            ]
        try:
            self.model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        for name, t in self.saved:
            np.round(t[0].numpy() * 2**16).astype(np.int32).tofile(out / f"layer-{name}.bin")
        self.saved = []


def floor_arrays(out: Path) -> list[np.ndarray]:
    """The capture's int32 files (primaries only: an alias is a hard link), in memory."""
    cap = zkllm_hf.load_capture(out)
    return [np.array(cap.codes(layer, p.name)) for layer in cap.layers for p in POINTS]


def run_floor(arrays: list[np.ndarray], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        a.tofile(out / f"f{i}.bin")
        hashlib.sha256(a).digest()


def timed(fn, *args) -> tuple[float, float]:
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w, time.process_time() - c


def bench_size(model, make_ids, n: int, repeats: int, root: Path) -> dict:
    ids = make_ids(n)
    out, naive_dir, floor_dir = root / f"cap-{n}", root / f"naive-{n}", root / f"floor-{n}"
    naive = NaiveCapture(model)
    run_plain(model, ids), run_capture(model, ids, out)  # warm-up
    arrays = floor_arrays(out)
    naive.run(ids, naive_dir), run_floor(arrays, floor_dir)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in ("plain", "capture", "naive", "floor")}
    for _ in range(repeats):
        rows["plain"].append(timed(run_plain, model, ids))
        rows["capture"].append(timed(run_capture, model, ids, out))
        rows["naive"].append(timed(naive.run, ids, naive_dir))
        rows["floor"].append(timed(run_floor, arrays, floor_dir))
    med = {k: statistics.median(w for w, _ in v) for k, v in rows.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in rows.items()}
    spread = {k: (min(w for w, _ in v), max(w for w, _ in v)) for k, v in rows.items()}
    nbytes = sum(a.nbytes for a in arrays)
    shutil.rmtree(naive_dir, ignore_errors=True), shutil.rmtree(floor_dir, ignore_errors=True)
    return {
        "seq_len": n,
        "bytes": nbytes,
        "median": med,
        "cpu": cpu,
        "spread": spread,
        "dir": str(out),
        "b_over_a_plus_d": med["capture"] / (med["plain"] + med["floor"]),
        "b_over_c": med["capture"] / med["naive"],
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
    args = ap.parse_args(argv)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
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
                    r = bench_size(model, make_ids, n, args.repeats, root / name)
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
    head = (
        f"{'model':<8} {'seq':>5} {'MB':>6} {'(a)plain':>9} {'(b)capt':>9} {'(c)naive':>9} {'(d)floor':>9} "
        f"{'b/(a+d)':>8} {'b/c':>6} {'capt MB/s':>9} {'+RSS MB':>8} {'layers':>6}"
    )
    print(head)
    print("-" * len(head))
    for name, e in rep["models"].items():
        for r in e["sizes"]:
            med = r["median"]
            rss = r.get("rss")
            extra = (
                f"{rss['added_over_plain'] / 1e6:>8.1f} {rss['added_over_plain'] / r['layer_bytes']:>6.2f}"
                if rss
                else f"{'':>8} {'':>6}"
            )
            print(
                f"{name:<8} {r['seq_len']:>5} {r['bytes'] / 1e6:>6.0f} {med['plain']:>9.3f} {med['capture']:>9.3f} "
                f"{med['naive']:>9.3f} {med['floor']:>9.3f} {r['b_over_a_plus_d']:>8.2f} {r['b_over_c']:>6.2f} "
                f"{r['capture_mb_s']:>9.0f} {extra}"
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
