"""``zkllm-hf plan`` and ``zkllm-hf compare``: the proving script for a valid unit, after zkLLM's limits are
checked and its output paths refused where they are not plan's; and a prover output compared with the capture."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import OutputRefused, PlanRefused
from .common import open_capture, ranges
from .exits import EXIT_INVALID, EXIT_OK, EXIT_USAGE, TOLERANCE_FROM, err, exit_code, fail

# -- plan ------------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    """``zkllm-hf plan``: validate the unit, check zkLLM's limits, find or write the model folder zkLLM loads
    (--model-dir) and write the script (stdout or --out)."""
    from ..prove import Plan, prover_problems, write_script

    cap = _valid_unit(args)
    if isinstance(cap, int):
        return cap
    capture_dir = Path(args.dir).resolve()
    layers = _layers(args, cap)
    if isinstance(layers, int):
        return layers
    paths = _outputs(args, capture_dir)
    if isinstance(paths, int):
        return paths
    out, scratch = paths
    root = Path(args.zkllm_root).expanduser().resolve()
    problems = prover_problems(cap, layers, root)
    if problems and not args.force:
        return fail(PlanRefused(problems))
    model = _model_dir(args, cap, capture_dir, out)
    if isinstance(model, int):
        return model
    model_dir, weights, notes, more = model
    problems = [*problems, *more]
    num_layers = int(cap.metadata["model"].get("num_hidden_layers") or max(cap.layers) + 1)
    budget = budget_lines(cap, layers)  # the proof budget: in the script's header and on stderr
    plan = Plan(
        capture_dir, root, scratch, model_dir, weights, num_layers, args.model_size, layers, problems, notes, budget
    )
    script = write_script(cap, plan)
    if out is None:
        sys.stdout.write(script)
    else:
        code = _write(out, script, args.overwrite, len(layers))
        if code is not None:
            return code
    for line in plan.budget:
        print(line, file=sys.stderr)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    return EXIT_OK


def _model_dir(args: argparse.Namespace, cap, capture_dir: Path, out: Path | None):
    """(the folder zkLLM loads, the weights fingerprint it must carry, header notes, warnings), exporting the
    capture's model there when the folder is new; or the exit code after saying why not."""
    from ..prove.export import describe_export, read_export

    if args.model_dir:
        path = unfollowed(args.model_dir)
    elif out is not None:
        path = out.with_name(out.stem + "-model")
    else:
        path = Path.cwd().resolve() / f"{capture_dir.name}-zkllm-model"
    if path == capture_dir or capture_dir in path.parents:
        err(f"--model-dir {path} lies inside the capture {capture_dir}; give a folder outside it")
        return EXIT_USAGE
    meta = cap.metadata["model"]
    fp = meta.get("weights_fingerprint")
    record = read_export(path) if path.is_dir() and not path.is_symlink() else None
    if record is None and (not path.exists() or (path.is_dir() and not path.is_symlink() and not any(path.iterdir()))):
        problem = _export(args, cap, path)
        if isinstance(problem, int):
            return problem
        if problem is not None:  # --force: the script is written all the same, and will stop at its weights check
            return path, str(fp), [], [f"plan could not export the model zkLLM loads into {path}: {problem}"]
        record = read_export(path)
    if record is not None:
        if record["source"]["weights_fingerprint"] != fp:
            err(
                f"--model-dir {path} holds the export of another model (weights "
                f"{record['source']['weights_fingerprint'][:16]}..., the capture's are {str(fp)[:16]}...); give plan "
                f"--model-dir a new folder and it exports this capture's model there"
            )
            return EXIT_USAGE
        return path, record["weights_fingerprint"], describe_export(record), []
    heads, kv = meta.get("num_attention_heads"), meta.get("num_key_value_heads")
    if not (path / "config.json").is_file() or (heads and kv and heads != kv):
        err(
            f"--model-dir {path} is not a model folder zkLLM can load for this capture (no export record"
            f"{'; the capture is grouped-query attention' if heads != kv else ', no config.json'}); give plan "
            f"--model-dir a new folder and it exports the capture's model there (its exact MHA expansion for GQA)"
        )
        return EXIT_USAGE
    return path, str(fp), [f"zkLLM loads {path} as it is; the script checks it carries the captured weights"], []


def _export(args: argparse.Namespace, cap, path: Path) -> int | str | None:
    """Export the capture's model into ``path``: None when done; else, with --force, why not (a warning), and
    without it the exit code after saying why not."""
    from ..errors import ExportRefused, ModelLoadError
    from ..prove.export import describe_export, export_zkllm_model

    try:
        model, tokenizer = _captured_model(cap, getattr(args, "model", None))
        record = export_zkllm_model(model, cap, path, tokenizer=tokenizer)
    except (ExportRefused, OutputRefused, ModelLoadError) as exc:
        if getattr(args, "force", False):
            return str(exc)
        return fail(exc)
    print(f"wrote {path}: the model zkLLM loads", file=sys.stderr)
    for line in describe_export(record):
        print(line, file=sys.stderr)
    return None


def _captured_model(cap, name: str | None):
    """The capture's model (and its tokenizer, or None), loaded as the capture ran it: --model, else the
    manifest's source (the default model, or its name or path), in the dtype it ran."""
    from ..errors import ModelLoadError
    from ..models import load

    meta, extra = cap.metadata.get("model", {}), cap.metadata.get("extra") or {}
    if name is None:
        source = extra.get("source") if isinstance(extra.get("source"), dict) else {}
        name = None if source.get("kind") == "default" else meta.get("name_or_path")
        if name is None and source.get("kind") != "default" or name == "":
            raise ModelLoadError(
                "the capture does not record where its model is (captured from a model built in memory): pass "
                "--model the folder it was saved to"
            )
    elif name == "default":
        name = None
    ran = extra.get("cli") if isinstance(extra.get("cli"), dict) else {}
    dtype = ran.get("dtype") if isinstance(ran.get("dtype"), str) else str(meta.get("dtype") or "float32")
    try:
        loaded = load(name, dtype=dtype)
    except ModelLoadError as exc:
        if "tokenizer" not in str(exc):
            raise
        loaded = load(name, dtype=dtype, tokenizer=False)
    return loaded.model, loaded.tokenizer


def cmd_export(args: argparse.Namespace) -> int:
    """``zkllm-hf export-zkllm-model``: write the model folder zkLLM loads for a valid unit."""
    cap = _valid_unit(args)
    if isinstance(cap, int):
        return cap
    out = unfollowed(args.out)
    capture_dir = Path(args.dir).resolve()
    if out == capture_dir or capture_dir in out.parents:
        err(f"{out} lies inside the capture {capture_dir}; give a folder outside it")
        return EXIT_USAGE
    return _export(args, cap, out) or EXIT_OK


def budget_lines(cap, layers: list[int]) -> list[str]:
    """The proof budget (prove/budget.py): printed on stderr before the script spends any GPU time, and kept
    in the script's header."""
    from ..prove.budget import budget_of

    return list(budget_of(cap, layers))


def _valid_unit(args: argparse.Namespace):
    """The capture at args.dir if it is one unit that passes its contract; else the exit code, after saying why."""
    from ..validate import CaptureDataset, validate

    cap = open_capture(args.dir)
    if isinstance(cap, int):
        return cap
    if isinstance(cap, CaptureDataset):
        first = next(iter(cap)).path
        err(
            f"{args.dir} is a dataset of {len(cap)} units; zkLLM proves one unit at a time: run plan on a unit "
            f"folder, e.g. {first}"
        )
        return EXIT_USAGE
    report = validate(args.dir)  # the script names only files of a capture that passes its contract
    if not report.ok:
        err(
            f"{args.dir} fails {len(report.failures)} contract check(s) (first: {report.failures[0].describe()}); "
            f"plan only feeds zkLLM a valid capture: run zkllm-hf validate {shlex.quote(str(args.dir))}"
        )
        return EXIT_INVALID
    return cap


def _layers(args: argparse.Namespace, cap) -> list[int] | int:
    """The captured layers --layers names (default: all), or the exit code after saying which are not."""
    from ..points import parse_layers

    try:
        layers = parse_layers(args.layers, max(cap.layers) + 1) if args.layers else list(cap.layers)
    except ValueError as exc:  # the message names the spec itself: said once, as the flag
        err(str(exc).replace(f"layer spec {args.layers!r}", f"--layers {args.layers}", 1))
        return EXIT_USAGE
    absent = [layer for layer in layers if layer not in cap.layers]
    if absent:
        err(f"--layers {args.layers}: layers {absent} are not in the capture (it holds {ranges(cap.layers)})")
        return EXIT_USAGE
    return layers


def _outputs(args: argparse.Namespace, capture_dir: Path) -> tuple[Path | None, Path] | int:
    """--out and --scratch made absolute and checked (never in the capture, only plan's own); or the exit code."""
    from ..prove import check_out, check_scratch

    out = unfollowed(args.out) if args.out else None  # the last component is never resolved: a link is refused
    scratch = unfollowed(args.scratch) if args.scratch else None
    if scratch is None:
        scratch = out.with_name(out.stem + "-outputs") if out else Path.cwd().resolve() / f"{capture_dir.name}-zkllm"
    for what, path in (("--out", out), ("--scratch", scratch)):
        if path is not None and (path == capture_dir or capture_dir in path.parents):
            err(f"{what} {path} lies inside the capture {capture_dir}; prover outputs never go into a capture")
            return EXIT_USAGE
    try:
        if out is not None:
            check_out(out, overwrite=args.overwrite)
        check_scratch(scratch)
    except OutputRefused as exc:
        return fail(exc)
    return out, scratch


def _write(out: Path, script: str, overwrite: bool, layers: int) -> int | None:
    """Write the script to --out; None when written, else the exit code after saying why not."""
    from ..prove import write_plan_file

    try:
        write_plan_file(out, script, overwrite=overwrite)
    except OutputRefused as exc:
        return fail(exc)
    print(f"wrote {out}: {layers} layer(s); run it with bash {shlex.quote(str(out))}", file=sys.stderr)
    return None


def unfollowed(path: str) -> Path:
    """``path`` made absolute with its folder resolved but not its last component, so that a symlink there is
    seen (and refused) rather than followed."""
    p = Path(path).expanduser()
    return p.resolve() if p.name in ("", ".", "..") else p.parent.resolve() / p.name


# -- compare ---------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    """``zkllm-hf compare``: exit 0 if PRODUCED reproduces CAPTURED within its tolerance, 1 if not, 2 if the files
    cannot be compared."""
    from ..prove import compare_files
    from ..validate import CaptureDataset, CaptureNotFinished, UnsafeManifestError, load_capture

    try:
        cap = load_capture(args.tolerance_from)
    except (UnsafeManifestError, CaptureNotFinished, OSError, ValueError) as exc:
        code = exit_code(exc, TOLERANCE_FROM)
        err(str(exc) if code == EXIT_INVALID else f"--tolerance-from: {exc}")  # a crafted manifest: invalid
        return code
    if isinstance(cap, CaptureDataset):
        err(f"--tolerance-from {args.tolerance_from} is a dataset; give the unit folder that holds {args.captured}")
        return EXIT_USAGE
    result = compare_files(Path(args.produced), Path(args.captured), cap, contract=args.contract)
    if result.ok:
        print(result.message)
        return EXIT_OK
    err(result.message)
    return EXIT_USAGE if result.input_error else EXIT_INVALID
