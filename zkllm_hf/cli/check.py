"""``zkllm-hf validate`` and ``zkllm-hf inspect``: a capture re-checked from disk (with --model, against the
model too), and a capture summarised, a unit or a dataset of units."""

from __future__ import annotations

import argparse
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
        table(["point", "files", "source", "int_min", "int_max", "headroom", "check", "worst ratio"], _point_rows(cap))
    )
    _print_failures(report)
    return EXIT_OK if report.ok else EXIT_INVALID


def _unit_fields(meta: dict, report) -> list[list[object]]:
    """The field/value rows of one unit's summary."""
    model, tokens, capture = meta["model"], meta["tokens"], meta["capture"]
    ids = tokens.get("input_ids") or []
    shown = ", ".join(map(str, ids[:12])) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    quant = model.get("quantization")
    names = report.contract.names_of("integrity") if report.contract is not None else frozenset()
    integrity = [r for r in report.results if r.check in names]
    return [
        ["model", f"{model['class']} ({model.get('model_type')}) {model.get('name_or_path')}"],
        [
            "weights",
            f"{model['dtype']}{', ' + str(quant.get('quant_method', quant)) if quant else ''}; "
            f"fingerprint {str(model.get('weights_fingerprint'))[:16]}...",
        ],
        ["tokens", f"[{shown}]"],
        [
            "seq_len",
            f"{tokens['seq_len']} ({tokens['prompt_token_count']} prompt + "
            f"{tokens['seq_len'] - tokens['prompt_token_count']} padding, pad id {tokens['pad_token_id']})",
        ],
        ["hidden_size", capture["hidden_size"]],
        ["layers", ranges(capture["layers"])],
        ["scale", f"2**{capture['scale_log2']}"],
        ["residuals", _residuals_line(meta)],
        ["runtime", _runtime_line(meta)],
        ["|gate_proj|", _gate_line(meta)],
        [
            "created",
            f"{capture['created_utc']} with zkllm_hf {meta['versions']['zkllm_hf']}, transformers "
            f"{meta['versions']['transformers']}, torch {meta['versions']['torch']}",
        ],
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


def _point_rows(cap) -> list[list[object]]:
    """One row per capture point: its files, source dtype, int range, worst headroom and worst check ratio."""
    from ..points import POINTS

    rows = []
    by_point: dict[str, list[dict]] = {}
    for r in cap.manifest.to_pylist():
        by_point.setdefault(r["point"], []).append(r)
    for p in POINTS:
        rs = by_point.get(p.name, [])
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["headroom"])
        checked = [r for r in rs if r["max_dev_ratio"] is not None]
        dev = max(checked, key=lambda r: r["max_dev_ratio"]) if checked else None
        rows.append(
            [
                p.name,
                len(rs),
                rs[0]["source_dtype"],
                min(r["int_min"] for r in rs),
                max(r["int_max"] for r in rs),
                f"{100 * worst['headroom']:.1f}% (L{worst['layer']})",
                rs[0]["check"] or (checked[0]["check"] if checked else "-"),
                f"{dev['max_dev_ratio']:.3f} (L{dev['layer']})" if dev else "-",
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
                ["weights", f"{model['dtype']}; fingerprint {str(model.get('weights_fingerprint'))[:16]}..."],
                ["layers", ranges(capture["layers"])],
                ["scale", f"2**{capture['scale_log2']}"],
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
        rows.append(
            [
                unit.path.relative_to(ds.path).as_posix(),
                unit.metadata["unit"]["phase"],
                tokens["seq_len"],
                f"[{shown}]",
                "valid" if not bad else f"{bad} failed",
            ]
        )
    print(table(["unit", "phase", "seq_len", "tokens", "checks"], rows))
    _print_failures(report)
    return EXIT_OK if report.ok else EXIT_INVALID


def _how(meta: dict) -> str:
    """How a dataset's units were made: generate()'s settings, the Trainer's, or one forward."""
    gen = meta.get("generation") or {}
    trainer = meta.get("trainer") or {}
    how = ", ".join(
        f"{k} {gen[k]}" for k in ("do_sample", "num_beams", "num_return_sequences", "max_new_tokens") if k in gen
    )
    how += f"; eos {gen.get('eos_token_id')}, pad {gen.get('pad_token_id')}" if gen else ""
    return how or (f"Trainer {trainer.get('on')}, first {trainer.get('max_samples')} samples" if trainer else "forward")
