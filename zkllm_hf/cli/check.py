"""``zkllm-hf validate`` and ``zkllm-hf inspect``: a capture re-checked from disk (with --model, against the
model too), and a capture summarised, a unit or a dataset of units."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import ModelLoadError, UnsupportedModelError
from .common import open_capture, ranges, table
from .exits import EXIT_INVALID, EXIT_OK, err, fail

# -- validate --------------------------------------------------------------------------------------


def recorded_load(directory: str) -> dict:
    """How the capture's model was loaded, from the model metadata every capture records (the CLI section of an
    older CLI capture where the metadata lacks it): ``dtype``, ``load_in_4bit``, ``load_in_8bit``."""
    from ..manifest import read_manifest

    try:
        meta = read_manifest(Path(directory) / "manifest.arrow")[1]
    except (OSError, ValueError):
        return {}  # validate reports an unreadable manifest itself
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    quant = model.get("quantization") if isinstance(model.get("quantization"), dict) else {}
    out: dict = {}
    if isinstance(model.get("dtype"), str):
        out["dtype"] = model["dtype"]
    out["load_in_4bit"] = bool(quant.get("load_in_4bit"))
    out["load_in_8bit"] = bool(quant.get("load_in_8bit"))
    out["quantization"] = quant or None
    extra = meta.get("extra")
    cli = extra.get("cli") if isinstance(extra, dict) and isinstance(extra.get("cli"), dict) else {}
    if "dtype" not in out and isinstance(cli.get("dtype"), str):
        out["dtype"] = cli["dtype"]
    return out


def load_mismatch(recorded: dict, dtype: str, four: bool, eight: bool) -> str | None:
    """One line naming the field that differs between the capture and how --model is loaded, and the flag."""
    if recorded.get("load_in_4bit") != four or recorded.get("load_in_8bit") != eight:
        then = "4-bit" if recorded.get("load_in_4bit") else "8-bit" if recorded.get("load_in_8bit") else "unquantized"
        flag = (
            "--load-in-4bit"
            if recorded.get("load_in_4bit")
            else "--load-in-8bit"
            if recorded.get("load_in_8bit")
            else "neither --load-in-4bit nor --load-in-8bit"
        )
        return f"model.quantization: the capture ran {then}, --model is loaded otherwise; pass {flag}"
    if recorded.get("dtype") not in (None, dtype) and not (four or eight):
        then = recorded["dtype"]
        return f"model.dtype: the capture ran {then}, --model is loaded as {dtype}; pass --dtype {then}"
    return None


def load_model_for_check(args: argparse.Namespace):
    """The model for validate --model, loaded as the capture ran it (dtype, 4-bit, 8-bit) unless told."""
    if args.model is None:
        return None
    from ..dtypes import LOAD_DTYPE_NAMES
    from ..models import load

    ran = recorded_load(args.dir)
    told = bool(args.dtype or args.load_in_4bit or args.load_in_8bit)
    dtype = args.dtype or (ran.get("dtype") if ran.get("dtype") in LOAD_DTYPE_NAMES else None) or "float32"
    four = args.load_in_4bit or (not told and bool(ran.get("load_in_4bit")))
    eight = args.load_in_8bit or (not told and bool(ran.get("load_in_8bit")))
    if ran and (hint := load_mismatch(ran, dtype, four, eight)) is not None:
        print(f"zkllm-hf: note: {hint}", file=sys.stderr)
    return load(
        None if args.model == "default" else args.model,
        dtype=dtype,
        load_in_4bit=four,
        load_in_8bit=eight,
        tokenizer=False,  # the checks read the weights and the config only
        quantization=ran.get("quantization"),
    ).model


def cmd_validate(args: argparse.Namespace) -> int:
    """``zkllm-hf validate``: the report on stdout, exit 1 (and one line on stderr) if the capture is invalid."""
    from ..hooks import find_layout
    from ..validate import validate

    if getattr(args, "replay", False) and args.model is None:
        return fail(ValueError("--replay re-runs the capture through a model: pass --model (or --model default)"))
    folder = Path(args.dir)
    if not (folder / "manifest.arrow").is_file():  # not a capture at all: the one line inspect gives too
        cap = open_capture(args.dir)
        if isinstance(cap, int):
            return cap
    try:
        model = load_model_for_check(args)
        if model is not None:
            try:
                find_layout(model)  # a model whose modules do not fit the point table cannot check a capture
            except UnsupportedModelError as exc:  # --model cannot be used: an input error
                raise ModelLoadError(f"--model {args.model}: {exc}") from None
    except ModelLoadError as exc:
        return fail(exc)
    replay = bool(getattr(args, "replay", False))
    report = validate(args.dir, model=model, progress=True, contract=args.contract, replay=replay)  # bars: a tty only
    print(report.to_json() if args.json else report)
    if not report.ok:  # the report is on stdout; stderr says in one line why the exit code is 1
        first = " ".join(report.failures[0].describe().split())
        err(f"{args.dir}: INVALID, {len(report.failures)} failed check(s); the first: {first}")
    return EXIT_OK if report.ok else EXIT_INVALID


# -- inspect ---------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    """``zkllm-hf inspect``: the capture's fields, then one row per point (or per unit of a dataset)."""
    from ..validate import CaptureDataset, validate

    cap = open_capture(args.dir)
    if isinstance(cap, int):
        return cap
    report = validate(args.dir)
    if isinstance(cap, CaptureDataset):
        return _inspect_dataset(cap, report)
    print(table(["field", "value"], _unit_fields(cap.metadata, report)))
    print()
    print(
        table(
            ["point", "files", "source dtype", "int_min", "int_max", "int32 used (worst)", "check", "worst deviation"],
            _point_rows(cap, _exact_checks(cap.metadata, report)),
        )
    )
    print_budget(cap)
    _print_failures(report)
    return EXIT_OK if report.ok else EXIT_INVALID


def print_budget(cap) -> None:
    """The proof budget of every captured layer (prove/budget.py), after a blank line."""
    from ..prove.budget import budget_of

    print()
    print("\n".join(budget_of(cap)))


def _unit_fields(meta: dict, report) -> list[list[object]]:
    """The field/value rows of one unit's summary."""
    model, tokens, capture = meta["model"], meta["tokens"], meta["capture"]
    ids = tokens.get("input_ids") or []
    shown = ", ".join(map(str, ids[:12])) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    names = report.contract.names_of("integrity") if report.contract is not None else frozenset()
    integrity = [r for r in report.results if r.check in names]
    return [
        ["model", f"{model['class']} ({model.get('model_type')}) {model.get('name_or_path')}"],
        ["weights", weights_line(meta)],
        ["tokens", f"[{shown}]"],
        ["seq_len", tokens_line(tokens)],
        ["hidden_size", capture["hidden_size"]],
        ["layers", ranges(capture["layers"])],
        ["scale", f"2**{capture['scale_log2']}"],
        *([["generation", _how(meta)]] if meta.get("generation") else []),
        ["residuals", _residuals_line(meta)],
        ["runtime", _runtime_line(meta)],
        ["|gate_proj|", _gate_line(meta)],
        ["created", f"{capture['created_utc']} with {versions_line(meta)}"],
        [
            "checksums",
            "all match" if all(r.passed for r in integrity) else f"{sum(not r.passed for r in integrity)} mismatch",
        ],
        ["contract", _contract_line(meta, report)],
    ]


def _contract_line(meta: dict, report) -> str:
    return (
        f"v{meta['contract']['version']}: {'VALID' if report.ok else 'INVALID'} "
        f"({len(report.results)} checks, {len(report.failures)} failed)"
    )


def _exact_checks(meta: dict, report) -> frozenset[str]:
    """The checks that hold exactly in this capture (tolerance zero): the contract's exact ones (the chain),
    and the skip sums of an exact-int capture."""
    if report.contract is None:
        return frozenset({"chain"})
    exact = set(report.contract.names_of("exact"))
    if (meta.get("residuals") or {}).get("mode") == "exact-int":
        exact |= report.contract.names_of("sum")
    return frozenset(exact)


def tokens_line(tokens: dict) -> str:
    """seq_len as the sum of its parts: the prompt's tokens, the generated ones and the padding."""
    n, prompt = tokens["seq_len"], tokens["prompt_token_count"]
    generated = tokens.get("generated_token_count") or 0
    padding = n - prompt - generated
    line = f"{n} = {prompt} prompt + {generated} generated + {padding} padding"
    if padding and tokens.get("pad_token_id") is not None:
        line += f" (pad id {tokens['pad_token_id']})"
    positions = tokens.get("position_ids") or []
    if not prompt and positions and positions[0]:  # a decode step: its token attends to the cache before it
        line += f", at position {positions[0]} after {positions[0]} cached"
    return line


GGUF_TYPE = re.compile(r"[.\-_](I?Q\d[A-Z0-9_]*|BF16|F16|F32)\.gguf$", re.I)  # a GGUF's type, as its name says


def weights_line(meta: dict) -> str:
    """The weights' dtype, where they came from (a GGUF file zkllm-hf converted, bitsandbytes) and their
    fingerprint. A GGUF's tensor type is read from its conventional file name (``...Q4_1.gguf``)."""
    model = meta["model"]
    what = str(model["dtype"])
    quant = model.get("quantization")
    if isinstance(quant, dict):
        bits = " 4-bit" if quant.get("load_in_4bit") else " 8-bit" if quant.get("load_in_8bit") else ""
        what += f", {quant.get('quant_method', 'quantized')}{bits}"
    source = model.get("source") or (meta.get("extra") or {}).get("source") or {}
    gguf = source.get("gguf_file") if isinstance(source, dict) else None
    if gguf:
        name = Path(str(gguf)).name
        kind = m.group(1).upper() if (m := GGUF_TYPE.search(name)) else None
        how = "converted" if kind in (None, "F32", "F16", "BF16") else "dequantised"
        what += f" ({how} from GGUF {kind}, {name})" if kind else f" ({how} from GGUF file {name})"
    return f"{what}; fingerprint {str(model.get('weights_fingerprint'))[:16]}..."


def _deviation(rows: list[dict], exact: bool) -> str:
    """A point's worst check result: 'exact' for a check of tolerance zero, else deviation / bound."""
    checked = [r for r in rows if r["max_dev_ratio"] is not None]
    if not checked:
        return "-"
    if exact:
        worst = max(checked, key=lambda r: r["max_dev_lsb"] or 0)
        lsb = worst["max_dev_lsb"] or 0
        return "exact (0 LSB apart)" if lsb == 0 else f"NOT exact: {lsb:g} LSB apart (L{worst['layer']})"
    dev = max(checked, key=lambda r: r["max_dev_ratio"])
    return f"{dev['max_dev_ratio']:.3f} of bound (L{dev['layer']})"


def _point_rows(cap, exact: frozenset[str] = frozenset()) -> list[list[object]]:
    """One row per capture point: its files, source dtype, int range, the most of int32 used, and its check's
    worst deviation as a fraction of the check's bound (or 'exact' for a check that holds exactly)."""
    from ..points import POINTS

    rows = []
    by_point: dict[str, list[dict]] = {}
    for r in cap.manifest.to_pylist():
        by_point.setdefault(r["point"], []).append(r)
    for p in POINTS:
        rs = by_point.get(p.name, [])
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["headroom"])  # the manifest's headroom is the fraction of int32 used
        checked = [r for r in rs if r["max_dev_ratio"] is not None]
        check = rs[0]["check"] or (checked[0]["check"] if checked else "-")
        rows.append(
            [
                p.name,
                len(rs),
                rs[0]["source_dtype"],
                min(r["int_min"] for r in rs),
                max(r["int_max"] for r in rs),
                f"{100 * worst['headroom']:.1f}% (L{worst['layer']})",
                check,
                _deviation(rs, check in exact),
            ]
        )
    return rows


def _print_failures(report) -> None:
    if report.failures:
        print("\nfailures:")
        for f in report.failures:
            print(f"  - {f.describe()}")


def _residuals_line(meta: dict) -> str:
    residuals = meta.get("residuals") or {}
    mode = residuals.get("mode", meta["capture"].get("residuals", "model"))
    if mode != "exact-int":
        return f"{mode} (the model's own values; skip outputs match within the sum tolerance)"
    drift = residuals.get("drift") or []
    if not drift:
        return "exact-int (no drift recorded)"
    worst = max(drift, key=lambda d: d["max_dev_lsb"])
    return (
        f"exact-int (derived in int32; largest drift from the model {worst['max_dev_lsb']:g} LSB at layer "
        f"{worst['layer']} {worst['point']})"
    )


def _gate_line(meta: dict) -> str:
    from ..prove import GATE_LIMIT

    gates = (meta.get("ffn") or {}).get("gate_abs_max") or []
    if not gates:
        return "not recorded"
    worst = max(gates, key=lambda g: g["value"])
    verdict = "within" if worst["value"] < GATE_LIMIT else "BEYOND"
    return f"largest {worst['value']:.4g} at layer {worst['layer']} ({verdict} zkLLM's SwiGLU table, < {GATE_LIMIT:g})"


def _runtime_line(meta: dict) -> str:
    """torch's intra-op threads, deterministic algorithms, attention and devices the forwards ran with."""
    rt = meta.get("runtime") or {}
    if "torch_threads" not in rt:
        return "not recorded (a capture made before zkllm-hf recorded it)"
    threads = rt["torch_threads"]
    shown = f"{threads} thread(s)" if isinstance(threads, int) else f"{'/'.join(map(str, threads))} thread(s), changed"
    devices = rt.get("devices")
    return (
        f"torch {shown}, deterministic algorithms {'on' if rt.get('deterministic_algorithms') else 'off'}, "
        f"attention {rt.get('attn_implementation')}, {', '.join(devices) if isinstance(devices, list) else devices}"
    )


def _inspect_dataset(ds, report) -> int:
    """A dataset's fields, then one row per unit."""
    meta = ds.metadata
    model, capture = meta["model"], meta["capture"]
    print(
        table(
            ["field", "value"],
            [
                ["dataset", f"{len(ds)} units, mode {capture['mode']} ({_how(meta)})"],
                ["model", f"{model['class']} ({model.get('model_type')}) {model.get('name_or_path')}"],
                ["weights", weights_line(meta)],
                ["layers", ranges(capture["layers"])],
                ["scale", f"2**{capture['scale_log2']}"],
                ["created", _created_span(ds, meta)],
                ["versions", versions_line(meta)],
                ["contract", _contract_line(meta, report)],
            ],
        )
    )
    print()
    rows = []
    for _, unit in sorted(ds.units.items()):
        tokens = unit.metadata["tokens"]
        ids = tokens.get("input_ids") or []
        shown = ", ".join(map(str, ids[:6])) + (", ..." if len(ids) > 6 else "")
        bad = sum(1 for f in report.failures if f.unit == unit.path.relative_to(ds.path).as_posix())
        prompt, generated = tokens["prompt_token_count"], tokens.get("generated_token_count") or 0
        parts = f"{prompt} + {generated} + {tokens['seq_len'] - prompt - generated}"
        rows.append(
            [
                unit.path.relative_to(ds.path).as_posix(),
                unit.metadata["unit"]["phase"],
                tokens["seq_len"],
                parts,
                f"[{shown}]",
                unit.metadata["capture"].get("created_utc", "-"),
                "valid" if not bad else f"{bad} failed",
            ]
        )
    print(table(["unit", "phase", "seq_len", "prompt + generated + padding", "tokens", "created", "checks"], rows))
    _print_failures(report)
    return EXIT_OK if report.ok else EXIT_INVALID


def versions_line(meta: dict) -> str:
    """The libraries a capture was made with, as its metadata records them."""
    v = meta.get("versions") or {}
    return ", ".join(f"{k} {v[k]}" for k in ("zkllm_hf", "transformers", "torch") if k in v) or "not recorded"


def _created_span(ds, meta: dict) -> str:
    """When the dataset's units were captured (first to last) and when its index was written."""
    times = sorted(str(u.metadata["capture"].get("created_utc")) for u in ds.units.values())
    index = meta["capture"].get("created_utc")
    span = times[0] if len(set(times)) == 1 else f"{times[0]} to {times[-1]}"
    return f"units {span}; index {index}" if times else f"index {index}"


def _how(meta: dict) -> str:
    """How a dataset's units were made: generate()'s settings, the Trainer's, or one forward."""
    gen = meta.get("generation") or {}
    trainer = meta.get("trainer") or {}
    keys = ("do_sample", "num_beams", "num_return_sequences", "max_new_tokens")
    keys += ("temperature", "top_p", "top_k", "seed") if gen.get("do_sample") else ()
    how = ", ".join(f"{k} {gen[k]}" for k in keys if k in gen)
    how += f"; eos {gen.get('eos_token_id')}, pad {gen.get('pad_token_id')}" if gen else ""
    return how or (f"Trainer {trainer.get('on')}, first {trainer.get('max_samples')} samples" if trainer else "forward")
