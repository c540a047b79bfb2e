"""Per token row, how far a genuine replay drifts from its capture, against a 3000-LSB half-row forgery.

The tolerant verdict's row rule (contracts/v1 ``replay_tolerant``: ``row_bias_alpha``, ``row_bias_lsb``) is
derived from these numbers: docs/architecture.md section 2, "Replay". For each model (the tests' tiny seeded
Llama and SmolLM2-135M) and dtype it captures once (1 thread, sdpa) and replays under other settings (2
threads; eager attention with 1 and 2 threads; teacher-forced, as every tolerant replay is). Per point and
token row it takes the fraction of elements within 1, 2, 4, 8 ulps, the signed bias ``|sum d| / sqrt(sum
d**2)`` and the mean signed deviation (d in LSB), and prints the genuine rows' worst values and the verdict.
Then it forges the capture: at every layer, ``attn_output`` and ``mlp_output`` get +3000 LSB over the first
half of one row (a different row per layer and point), replays it under each setting and prints the forged
rows' least visible values and how many forged points fail.

    python bench/replay_rows.py --tokens 256 --models tiny,smollm2 --seeds 2
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from replay_tolerance import settings  # noqa: E402

import zkllm_hf  # noqa: E402
from zkllm_hf.contracts import ULP_STEPS, load_contract  # noqa: E402
from zkllm_hf.contracts.replay_checks import row_statistics  # noqa: E402
from zkllm_hf.manifest import read_manifest  # noqa: E402
from zkllm_hf.replay import replay_capture  # noqa: E402

VARIANTS = {"2 threads": (2, "sdpa"), "eager": (1, "eager"), "eager, 2 threads": (2, "eager")}
FORGED = ("attn_output", "mlp_output")


def build(name: str, dtype: str):
    if name == "tiny":
        from conftest import make_tiny

        return make_tiny(dtype=getattr(torch, dtype))
    from zkllm_hf.models import load

    return load(None, dtype=dtype, tokenizer=False).model


def forge(folder: Path, layers: int, tokens: int) -> dict[tuple[int, str], int]:
    """+3000 LSB over the first half of one row of attn_output and mlp_output at every layer; the rows forged."""
    table, _ = read_manifest(folder / "manifest.arrow")
    rows = {(r["layer"], r["point"]): r for r in table.to_pylist() if r["point"] in FORGED}
    where = {}
    for (layer, point), r in rows.items():
        row = (7 * layer + 3 * FORGED.index(point) + 1) % tokens
        data = np.fromfile(folder / r["file"], dtype="<i4").reshape(r["rows"], r["cols"]).astype(np.int64)
        data[row, : r["cols"] // 2] += 3000
        data.astype("<i4").tofile(folder / r["file"])
        where[(layer, point)] = row
    return where


def summarise(label: str, outcome, forged: dict | None) -> dict:
    """The genuine rows' worst (smallest) fraction within k ulps and largest bias; the forged rows' best."""
    genuine = {k: 1.0 for k in ULP_STEPS} | {"t": 0.0, "mean": 0.0}
    caught = {k: 0.0 for k in ULP_STEPS} | {"t": float("inf"), "mean": float("inf")}
    for s in outcome.stats:
        if not s.elements:
            continue
        within, bias, mean = row_statistics(s)
        keep = np.ones(bias.size, bool)
        skip = forged.get((s.layer, s.point)) if forged else None
        if skip is not None:
            keep[skip] = False
            for k in ULP_STEPS:
                caught[k] = max(caught[k], float(within[k][skip]))
            caught["t"] = min(caught["t"], float(bias[skip]))
            caught["mean"] = min(caught["mean"], abs(float(mean[skip])))
        if keep.any():
            for k in ULP_STEPS:
                genuine[k] = min(genuine[k], float(within[k][keep].min()))
            genuine["t"] = max(genuine["t"], float(bias[keep].max()))
            biased = keep & (bias > 3.0)
            if biased.any():  # the largest |mean deviation| of a row whose bias alone looks suspect
                genuine["mean"] = max(genuine["mean"], float(np.abs(mean[biased]).max()))
    text = "genuine rows: min " + ", ".join(f"<={k} {genuine[k]:.3f}" for k in ULP_STEPS)
    text += f", max t {genuine['t']:.2f}, max |mean| (t > 3) {genuine['mean']:.1f} LSB"
    if forged:
        text += "; forged rows: max " + ", ".join(f"<={k} {caught[k]:.3f}" for k in ULP_STEPS)
        text += f", min t {caught['t']:.2f}, min |mean| {caught['mean']:.1f} LSB"
    failed = {(r.layer, r.point) for r in outcome.results if r.check == "replay_tolerant" and r.failed}
    if forged:
        text += f"; verdict: {len(failed & set(forged))}/{len(forged)} forged points fail"
    else:
        text += f"; verdict: {len(failed)} points fail"
    print(f"{label:44s} {text}", flush=True)
    return {"genuine": genuine, "forged": caught if forged else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--seeds", type=int, default=3, help="token draws per model and dtype")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    contract = load_contract("v1")
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            model = build(name, dtype)
            tokens = 12 if name == "tiny" else args.tokens
            layers = model.config.num_hidden_layers
            for seed in range(args.seeds):
                g = torch.Generator().manual_seed(seed)
                ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
                with tempfile.TemporaryDirectory() as tmp:
                    out, bad = Path(tmp) / "cap", Path(tmp) / "bad"
                    with settings(1, "sdpa", model=model), torch.no_grad(), zkllm_hf.capture(model, out):
                        model(input_ids=ids)
                    shutil.copytree(out, bad)
                    where = forge(bad, layers, tokens)
                    for variant, (threads, attn) in VARIANTS.items():
                        with settings(threads, attn, model=model):
                            label = f"{name} {dtype} seed {seed} {variant}"
                            summarise(label, replay_capture(out, model, contract), None)
                            summarise(f"{label} FORGED", replay_capture(bad, model, contract), where)


if __name__ == "__main__":
    main()
