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
    """``zkllm-hf plan``: validate the unit, check zkLLM's limits and write the script (stdout or --out)."""
    from ..prove import Plan, prover_notes, prover_problems, write_script

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
    problems = prover_problems(cap, args.model_size, layers, root)
    if problems and not args.force:
        return fail(PlanRefused(problems))
    notes = prover_notes(cap, args.model_size)
    script = write_script(cap, Plan(capture_dir, root, scratch, args.model_size, layers, problems, notes))
    if out is None:
        sys.stdout.write(script)
    else:
        code = _write(out, script, args.overwrite, len(layers))
        if code is not None:
            return code
    for p in [*problems, *notes]:
        print(f"warning: {p}", file=sys.stderr)
    print_budget(cap, layers)
    return EXIT_OK


def print_budget(cap, layers: list[int]) -> None:
    """The proof budget (prove/budget.py) on stderr, before the script spends any GPU time."""
    from ..prove.budget import budget_of

    print("\n".join(budget_of(cap, layers)), file=sys.stderr)


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
