"""The hand-off to zkLLM: what its scripts will reject, a runnable proving script, and the skip-step comparison.

zkLLM (jvhs0706/zkllm-ccs2024) proves one decoder layer at a time with Python wrappers that run from the
zkLLM folder, load ``meta-llama/Llama-2-{7,13}b-hf`` by name and ignore their binaries' exit codes. Two of
them (``llama-rmsnorm.py``, ``llama-ffn.py``) write random data to a missing input path and prove that. The
script :func:`write_script` produces therefore checks everything itself: each input exists before its step,
each step printed zkLLM's success line (or wrote its output), and each skip connection's output equals the
captured next point within the contract's tolerance (``zkllm-hf compare``). See docs/architecture.md §5.

A script plan wrote is known by its content, never by its name: its second line is ``# zkllm-hf plan
sha256:HEX``, HEX the SHA-256 of every other byte of the script (:func:`is_plan_script`), so an edited script,
or a foreign file with that line pasted in, is not plan's. :func:`write_plan_file` writes the script
atomically and replaces only such a file; it never follows a symlink and never chmods what it did not create.
The script's scratch folder is marked the same way (:data:`SCRATCH_MARK`), and the script refuses one that
is a link or holds files it did not write.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import secrets
import shlex
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from . import fixed_point as fp
from .contracts import inside
from .manifest import rows_digest
from .profile import zkllm_limit_warnings
from .provenance import utc_now

# The dims zkLLM's scripts read from the model they load by name (model_card = meta-llama/Llama-2-{size}b-hf).
LLAMA2 = {
    7: {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "rms_norm_eps": 1e-5,
    },
    13: {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "num_hidden_layers": 40,
        "rms_norm_eps": 1e-5,
    },
}
GATE_LIMIT = 512.0  # llama-ffn.py's SwiGLU table spans x in [-512, 512)
ZKLLM_SCALE_LOG2 = 16  # zkLLM's kernels and llama-commit.py assume activations at 2**16
SCRIPTS = (
    "llama-ppgen.py",
    "llama-commit.py",
    "llama-rmsnorm.py",
    "llama-self-attn.py",
    "llama-ffn.py",
    "llama-skip-connection.py",
)
# Parameters of one Llama-2 decoder layer, as llama-ppgen.py and llama-commit.py name their files.
LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)
# What zkLLM's wrappers and binaries print on success; they exit 0 whatever their binary did.
SUCCESS = {
    "self-attn": ("QKV linear proof successfully verified!", "Self attention proof successfully verified!"),
    "ffn": ("SwiGLU proof complete.",),
}
# What a failure prints (an uncaught C++ exception, a Python error, a wrapper's own refusal).
FAILURE_PATTERN = (
    r"terminate called|what\(\):|Traceback \(most recent call last\)|Segmentation fault|Aborted|"
    r"Error compiling|Input or output file does not exist"
)


PLAN_MARK = "# zkllm-hf plan sha256:"  # line 2 of every script plan writes; the digest of the other bytes
SCRATCH_MARK = ".zkllm-plan-scratch"  # the file a plan script leaves in the scratch folder it made
_MAX_SCRIPT = 64 << 20  # a file larger than this is not a plan script (one layer takes about 3 KB)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLOAT_DTYPES = {str(t).removeprefix("torch."): t for t in _FLOATS}


class OutputRefused(ValueError):
    """plan will not write its script (or let it write its outputs) there; the message names the path and the fix."""


class PlanRefused(ValueError):
    """zkLLM would reject (or silently mis-prove) this capture; ``problems`` lists each limit and its fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"zkLLM cannot prove this capture as it stands:\n{lines}\n(--force writes the script anyway)")


# --------------------------------------------------------------------------------------------------
# What zkLLM will reject


def prover_problems(cap: Any, model_size: int, layers: Sequence[int], zkllm_root: Path | None) -> list[str]:
    """Every zkLLM limit the capture (``validate.Capture``) does not meet, each naming the value and the fix."""
    meta = cap.metadata
    model = meta.get("model", {})
    out = zkllm_limit_warnings(
        cap.seq_len,
        cap.hidden_size,
        model.get("intermediate_size"),
        paddable=meta.get("capture", {}).get("mode", "forward") in ("forward", "full", "evaluate", "predict"),
        num_attention_heads=model.get("num_attention_heads"),
        num_key_value_heads=model.get("num_key_value_heads"),
    )
    if cap.scale_log2 != ZKLLM_SCALE_LOG2:
        out.append(
            f"the capture is at scale 2**{cap.scale_log2}; zkLLM's kernels read activations at 2**{ZKLLM_SCALE_LOG2}: "
            f"capture again with --scale-log2 {ZKLLM_SCALE_LOG2}"
        )
    gates = {int(e["layer"]): float(e["value"]) for e in (meta.get("ffn") or {}).get("gate_abs_max") or []}
    missing = [layer for layer in layers if layer not in gates]
    if missing:
        out.append(
            f"the capture records no gate_proj range for layers {missing} (made by an older zkllm-hf, or a model "
            f"without mlp.gate_proj); zkLLM's SwiGLU table needs |gate| < {GATE_LIMIT:g}: capture again to check it"
        )
    over = {layer: v for layer, v in gates.items() if layer in layers and not v < GATE_LIMIT}
    if over:
        worst = max(over, key=over.__getitem__)
        out.append(
            f"|gate_proj output| reaches {over[worst]:.6g} at layer {worst} ({len(over)} layer(s) at or above "
            f"{GATE_LIMIT:g}); llama-ffn.py's SwiGLU table covers [-512, 512) only: widen prepare_swiglu's range in "
            f"llama-ffn.py (and the table size ffn.cu expects), or prove other layers with --layers"
        )
    expected = LLAMA2[model_size]
    differ = []
    for key, want in expected.items():
        have = model.get(key)
        if have is None or (not math.isclose(float(have), float(want)) if key == "rms_norm_eps" else have != want):
            differ.append(f"{key} {have} (Llama-2-{model_size}B: {want})")
    if differ:
        out.append(
            f"zkLLM's scripts load meta-llama/Llama-2-{model_size}b-hf by name and prove with its weights, and this "
            f"capture's model differs: {', '.join(differ)}. To prove this model, change model_card in every "
            f"llama-*.py to it (and add GQA to the attention kernel if it has fewer key/value heads)"
        )
    bad_layers = [layer for layer in layers if layer >= expected["num_hidden_layers"]]
    if bad_layers:
        out.append(
            f"layers {bad_layers} do not exist in Llama-2-{model_size}B ({expected['num_hidden_layers']} layers)"
        )
    if zkllm_root is not None:
        absent = [s for s in SCRIPTS if not (zkllm_root / s).is_file()]
        if absent:
            out.append(
                f"{zkllm_root} is not a zkllm-ccs2024 checkout (no {', '.join(absent)}): pass --zkllm-root the folder "
                f"of git clone https://github.com/jvhs0706/zkllm-ccs2024"
            )
    return out


def prover_notes(cap: Any, model_size: int) -> list[str]:
    """What plan cannot check but the prover's user must know: zkLLM proves with the weights of the model it
    loads by name, whatever model the capture came from."""
    name = str(cap.metadata.get("model", {}).get("name_or_path") or "")
    if f"llama-2-{model_size}b" in name.lower().replace("_", "-"):
        return []
    return [
        f"the capture's model is {name or 'unnamed'}; zkLLM commits to and proves with the weights of "
        f"meta-llama/Llama-2-{model_size}b-hf, so unless these are exactly those weights the proof is about "
        f"another model (compare the manifest's weights_fingerprint with that model's)"
    ]


# --------------------------------------------------------------------------------------------------
# The script


@dataclass(frozen=True)
class Plan:
    capture: Path  # absolute
    zkllm_root: Path  # absolute
    scratch: Path  # absolute; prover outputs and logs, never inside the capture
    model_size: int
    layers: list[int]
    warnings: list[str]  # limits zkLLM would reject (written only with --force)
    notes: list[str] = field(default_factory=list)  # what the user must know but plan cannot check


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _c(text: object) -> str:
    """Text for a ``#`` comment: control characters escaped, so that no name can end the comment line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def write_script(cap: Any, plan: Plan, *, python: str = sys.executable) -> str:
    """The bash script that proves ``plan.layers`` of the capture with zkLLM, in zkLLM's README order."""
    d = plan.capture
    n, size = cap.seq_len, plan.model_size

    def f(layer: int, point: str) -> str:
        path = inside(d, str(cap.rows[(layer, point)]["file"]))  # only files inside the capture, never a row's text
        if path is None or not path.is_file():
            raise ValueError(f"layer {layer} {point}: the manifest's file is not inside {d}; validate the capture")
        return _q(path)

    workdir = f"./zkllm-workdir/Llama-2-{size}b"
    lines = [
        "#!/usr/bin/env bash",
        f"# Prove a zkllm-hf capture with zkLLM (jvhs0706/zkllm-ccs2024). Written by zkllm-hf {__version__} plan,",
        f"# {utc_now()}.",
        f"#   capture: {_c(d)} (seq_len {n}, hidden {cap.hidden_size}, residuals "
        f"{_c(cap.metadata.get('capture', {}).get('residuals', 'model'))})",
        f"#   layers:  {', '.join(map(str, plan.layers))}",
        f"#   zkLLM:   {_c(plan.zkllm_root)} (model size {size}B); prover outputs and logs: {_c(plan.scratch)}",
        "# Every step reads captured files, never the prover's own outputs. zkLLM's wrappers exit 0 whatever their",
        "# binaries did, so each step's log is checked for zkLLM's success line, and each skip connection's output is",
        "# compared with the captured next point (zkllm-hf compare). Set ZKLLM_PYTHON to zkLLM's Python if it is not",
        "# `python` on PATH.",
    ]
    if plan.warnings:
        lines.append("#")
        lines.append("# WARNING: written with --force; zkLLM will reject or mis-prove this capture as it stands:")
        for w in plan.warnings:
            lines.append(f"#   - {_c(w)}")
    for note in plan.notes:
        lines.append(f"# NOTE: {_c(note)}")
    lines += [
        "set -euo pipefail",
        "",
        f"ZKLLM_ROOT={_q(plan.zkllm_root)}",
        f"CAPTURE={_q(d)}",
        f"SCRATCH={_q(plan.scratch)}",
        'PY="${ZKLLM_PYTHON:-python}"',
        f"ZKLLM_HF=({_q(python)} -m zkllm_hf)",
        "",
        'fail() { echo "prove: $*" >&2; exit 1; }',
        'need() { local f; for f in "$@"; do [[ -f "$f" ]] || fail "missing input file: $f"; done; }',
        'made() { local f; for f in "$@"; do [[ -s "$f" ]] || fail "zkLLM wrote no $f"; done; }',
        "# step NAME LOG SUCCESS_LINE... -- COMMAND...: run it and keep its log; fail on an error or a missing",
        "# success line.",
        "step() {",
        "  local name=$1 log=$2; shift 2",
        "  local -a success=()",
        '  while [[ $1 != -- ]]; do success+=("$1"); shift; done; shift',
        '  echo "== $name"',
        '  "$@" 2>&1 | tee "$log"',
        f'  if grep -Eq {_q(FAILURE_PATTERN)} "$log"; then fail "$name failed (see $log)"; fi',
        '  local s; for s in "${success[@]}"; do',
        '    grep -Fq -- "$s" "$log" || fail "$name: zkLLM did not print \'$s\' (see $log)"',
        "  done",
        "}",
        "",
        "# The scratch folder is this script's own: made here (and marked), or marked by an earlier run, or empty.",
        f'SCRATCH_MARK="$SCRATCH/{SCRATCH_MARK}"',
        "if [[ -L $SCRATCH ]]; then",
        '  fail "scratch folder $SCRATCH is a symbolic link; give plan --scratch a new folder"',
        'elif [[ ! -e $SCRATCH ]]; then mkdir -p -- "$(dirname -- "$SCRATCH")"; mkdir -- "$SCRATCH"',
        "elif [[ ! -d $SCRATCH ]]; then",
        '  fail "scratch folder $SCRATCH is not a folder; give plan --scratch a new folder"',
        'elif [[ -L $SCRATCH_MARK || ! -f $SCRATCH_MARK ]] && [[ -n $(ls -A -- "$SCRATCH") ]]; then',
        '  fail "scratch folder $SCRATCH holds files a plan script did not write; give plan --scratch a new folder"',
        "fi",
        "[[ -f $SCRATCH_MARK && ! -L $SCRATCH_MARK ]] ||",
        '  (set -C; echo "zkllm-hf plan scratch folder" >"$SCRATCH_MARK")',
        'cd -- "$ZKLLM_ROOT"',
        "for s in " + " ".join(SCRIPTS) + "; do",
        '  [[ -f $s ]] || fail "$ZKLLM_ROOT has no $s: not a zkllm-ccs2024 checkout"',
        "done",
        "# The capture's files are still the ones plan checked.",
        '"${ZKLLM_HF[@]}" validate "$CAPTURE" >"$SCRATCH/validate.log" || fail "the capture no longer validates (see '
        '$SCRATCH/validate.log)"',
        "",
        "# One-time, per model: public parameters and weight commitments (skipped when their outputs exist).",
        f"WORKDIR={workdir}",
    ]
    pp = " ".join(f'"$WORKDIR/{p}-pp.bin"' for p in LAYER_PARAMS)
    lines += [
        'have_all() { local f; for f in "$@"; do [[ -f "$f" ]] || return 1; done; }',
        f"if ! have_all {pp}; then",
        f'  step ppgen "$SCRATCH/ppgen.log" -- "$PY" llama-ppgen.py {size}',
        f'  have_all {pp} || fail "llama-ppgen.py wrote no public parameters into $WORKDIR"',
        "fi",
        "COMMITMENTS=()",
        f"for i in $(seq 0 {LLAMA2[size]['num_hidden_layers'] - 1}); do",
        "  for p in " + " ".join(LAYER_PARAMS) + "; do",
        '    COMMITMENTS+=("$WORKDIR/layer-$i-$p-commitment.bin")',
        "  done",
        "done",
        'if ! have_all "${COMMITMENTS[@]}"; then',
        f'  step commit "$SCRATCH/commit.log" -- "$PY" llama-commit.py {size} {ZKLLM_SCALE_LOG2}',
        '  have_all "${COMMITMENTS[@]}" || fail "llama-commit.py wrote no commitments into $WORKDIR"',
        "fi",
    ]
    for layer in plan.layers:
        o = f'"$SCRATCH/layer-{layer}'
        block_input, norm_out = f(layer, "block_input"), f(layer, "input_layernorm_output")
        attn_out, residual = f(layer, "attn_output"), f(layer, "post_attn_residual")
        ffn_in, mlp_out, block_out = f(layer, "ffn_input"), f(layer, "mlp_output"), f(layer, "block_output")
        lines += [
            "",
            f"# ---- layer {layer}",
            f'mkdir -p -- "$SCRATCH/layer-{layer}"',
            f"need {block_input}",
            f'rm -f -- {o}/rmsnorm-input.bin"',
            f'step "layer {layer}: input RMSNorm" {o}/rmsnorm-input.log" -- "$PY" llama-rmsnorm.py {size} {layer} '
            f'input {n} --input_file {block_input} --output_file {o}/rmsnorm-input.bin"',
            f'made {o}/rmsnorm-input.bin"',
            f"need {norm_out}",
            f'step "layer {layer}: self-attention" {o}/self-attn.log" {_q(SUCCESS["self-attn"][0])} '
            f'{_q(SUCCESS["self-attn"][1])} -- "$PY" llama-self-attn.py {size} {layer} {n} --input_file {norm_out} '
            f'--output_file {o}/self-attn.bin"',
            f"need {block_input} {attn_out}",
            f'rm -f -- {o}/skip-1.bin"',
            f'step "layer {layer}: skip connection 1" {o}/skip-1.log" -- "$PY" llama-skip-connection.py '
            f'--block_input_file {block_input} --block_output_file {attn_out} --output_file {o}/skip-1.bin"',
            f'made {o}/skip-1.bin"',
            f'"${{ZKLLM_HF[@]}}" compare {o}/skip-1.bin" {residual} --tolerance-from "$CAPTURE" '
            f'|| fail "layer {layer}: skip connection 1 does not reproduce the captured post-attention residual"',
            f"need {residual}",
            f'rm -f -- {o}/rmsnorm-post.bin"',
            f'step "layer {layer}: post-attention RMSNorm" {o}/rmsnorm-post.log" -- "$PY" llama-rmsnorm.py {size} '
            f'{layer} post_attention {n} --input_file {residual} --output_file {o}/rmsnorm-post.bin"',
            f'made {o}/rmsnorm-post.bin"',
            f"need {ffn_in}",
            f'rm -f -- {o}/ffn.bin"',
            f'step "layer {layer}: FFN" {o}/ffn.log" {_q(SUCCESS["ffn"][0])} -- "$PY" llama-ffn.py {size} {layer} {n} '
            f'--input_file {ffn_in} --output_file {o}/ffn.bin"',
            f"need {residual} {mlp_out}",
            f'rm -f -- {o}/skip-2.bin"',
            f'step "layer {layer}: skip connection 2" {o}/skip-2.log" -- "$PY" llama-skip-connection.py '
            f'--block_input_file {residual} --block_output_file {mlp_out} --output_file {o}/skip-2.bin"',
            f'made {o}/skip-2.bin"',
            f'"${{ZKLLM_HF[@]}}" compare {o}/skip-2.bin" {block_out} --tolerance-from "$CAPTURE" '
            f'|| fail "layer {layer}: skip connection 2 does not reproduce the captured block output"',
        ]
    lines += ["", f'echo "zkLLM proved layers {", ".join(map(str, plan.layers))} of $CAPTURE"', ""]
    return _sign("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Writing the script: only a new file, or (with overwrite) a script plan wrote; never through a link


def _sign(script: str) -> str:
    """``script`` with :data:`PLAN_MARK` and the SHA-256 of its bytes inserted as the second line."""
    first, _, rest = script.partition("\n")
    digest = hashlib.sha256(f"{first}\n{rest}".encode()).hexdigest()
    return f"{first}\n{PLAN_MARK}{digest}\n{rest}"


def is_plan_script(data: bytes) -> bool:
    """Whether ``data`` is a script plan wrote, unedited: line 2 is :data:`PLAN_MARK` and the SHA-256 of the
    script's bytes without that line."""
    parts = data.split(b"\n", 2)
    if len(parts) < 3 or not parts[1].startswith(PLAN_MARK.encode()):
        return False
    digest = parts[1][len(PLAN_MARK) :]
    return re.fullmatch(rb"[0-9a-f]{64}", digest) is not None and hashlib.sha256(
        parts[0] + b"\n" + parts[2]
    ).hexdigest() == digest.decode()


def _is_ours(path: Path) -> bool:
    """Whether the regular file at ``path`` (opened without following a link) is a plan script."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SCRIPT:
            return False
        chunks, left = [], st.st_size + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return left > 0 and is_plan_script(b"".join(chunks))
    finally:
        os.close(fd)


def check_out(path: Path, *, overwrite: bool) -> bool:
    """Whether ``path`` holds a script plan wrote (which ``overwrite`` lets plan replace); False if nothing is
    there. Raises :class:`OutputRefused` for a link, a folder, anything else, or without ``overwrite``."""
    what = f"--out {path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise OutputRefused(f"{what}: the folder {path.parent} does not exist; create it first") from None
        return False
    if stat.S_ISLNK(st.st_mode):
        raise OutputRefused(
            f"{what} is a symbolic link; plan never writes through one: give the path of a new file (the link "
            f"and what it points to are left as they are)"
        )
    if stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"{what} is a folder; give the script's file name, e.g. {path / 'prove.sh'}")
    try:
        mine = stat.S_ISREG(st.st_mode) and _is_ours(path)
    except OSError as exc:
        raise OutputRefused(
            f"{what} exists and cannot be read ({exc.strerror or exc}), so it cannot be recognised as a script "
            f"plan wrote; plan will not replace it: give another --out"
        ) from None
    if not mine:
        raise OutputRefused(
            f"{what} exists and is not a script zkllm-hf plan wrote (or it was edited since); plan will not replace "
            f"it: give another --out, or move the file away yourself"
        )
    if not overwrite:
        raise OutputRefused(f"{what} is a script zkllm-hf plan wrote: pass --overwrite to replace it, or another --out")
    return True


def check_scratch(path: Path) -> None:
    """Raise :class:`OutputRefused` unless ``path`` is absent, an empty folder, or a scratch folder a plan
    script marked (:data:`SCRATCH_MARK`): the script writes and deletes files there."""
    what = f"--scratch {path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputRefused(f"{what} is a symbolic link; the script never writes through one: give a new folder")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"{what} is not a folder; give a new folder for zkLLM's outputs and logs")
    try:
        marked = stat.S_ISREG(os.lstat(path / SCRATCH_MARK).st_mode)
    except FileNotFoundError:
        marked = False
    if not marked and any(os.scandir(path)):
        raise OutputRefused(
            f"{what} is not a folder plan made for its script (it holds files and no {SCRATCH_MARK}); the script "
            f"writes and deletes files there: give a new or empty folder, e.g. {path.with_name(path.name + '-zkllm')}"
        )


def write_plan_file(path: Path, script: str, *, overwrite: bool = False) -> None:
    """Write ``script`` to ``path`` atomically: a new file, or in place of a script plan wrote (``overwrite``).

    The bytes go to a fresh temporary file beside ``path`` (created exclusively, mode 0o755 less the umask,
    fsynced), which is then hard-linked into place when ``path`` does not exist (so nothing that appeared
    there meanwhile is replaced) or renamed over plan's own script. Raises :class:`OutputRefused` (see
    :func:`check_out`) and OSError; on any failure the temporary file is removed and ``path`` is as it was.
    """
    replace = check_out(path, overwrite=overwrite)
    data = script.encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.zkllm-plan-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o755)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        if replace:
            check_out(path, overwrite=True)  # still plan's own script, not a link put there since
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputRefused(f"--out {path} appeared while plan was writing; it was left as it is") from None
            except OSError as exc:  # a file system without hard links: create the file exclusively instead
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                _create_exclusively(path, data)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_folder(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _create_exclusively(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o755)
    except FileExistsError:
        raise OutputRefused(f"--out {path} appeared while plan was writing; it was left as it is") from None
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(path)  # the file plan just created, half-written
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is done either way
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# zkllm-hf compare: a prover output against a captured file, within the contract's tolerance


@dataclass(frozen=True)
class Comparison:
    ok: bool
    message: str
    input_error: bool = False  # the files could not be compared at all (exit 2), rather than differ (exit 1)


def _input_error(message: str) -> Comparison:
    return Comparison(False, message, input_error=True)


def _read_int32(path: Path, size: int, what: str) -> np.ndarray | Comparison:
    """The bytes of a regular file of exactly ``size`` bytes as int32, or the input error saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not block
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _input_error(f"{path} is not a file; give the {what}")
            if st.st_size != size:
                return _input_error(f"{path} holds {st.st_size} bytes; the {what} is {size} bytes")
            chunks, left = [], size + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return _input_error(f"{path} does not exist; give the {what}")
    except OSError as exc:
        return _input_error(f"cannot read {path}: {exc.strerror or exc}")
    if len(data) != size:
        return _input_error(f"{path} changed while it was read ({len(data)} bytes, not {size})")
    return np.frombuffer(data, dtype="<i4")


def compare_files(produced: Path, captured: Path, capture: Any, *, contract: str | None = None) -> Comparison:
    """Compare ``produced`` (a zkLLM skip output) with ``captured``, a file of ``capture`` (``validate.Capture``).

    A residual point (post_attn_residual, block_output) is compared within the tolerance of the contract's sum
    check whose result it is, as the model's float add allows; in a capture made with
    ``residuals="exact-int"``, and for every other point, the files must be equal. The contract is a packaged
    one, or the folder the manifest names only if ``contract`` names it too (as for ``validate``). The captured
    file must still be the one the manifest recorded (its size and SHA-256, under the manifest's digest).
    ``input_error`` is set when the files cannot be compared: a missing, unreadable or wrong-sized file, a
    file that is not the capture's, or a contract that is not trusted.
    """
    from .validate import _contract_of

    folder = Path(capture.path).resolve()
    target = Path(captured).resolve()  # the capture and the file resolve alike: relative paths, symlinks
    named = ((r, inside(folder, str(r["file"]))) for r in capture.rows.values())
    row = next((r for r, p in named if p is not None and p.resolve() == target), None)
    if row is None:
        return _input_error(
            f"{captured} is not a file of the capture at {capture.path} (its manifest names no such file); give "
            f"one of its files, or the --tolerance-from folder that holds it"
        )
    rows, cols = int(row["rows"]), int(row["cols"])
    what = f"layer {row['layer']} {row['point']}"
    if not target.exists():
        return _input_error(f"{captured} does not exist; the capture at {capture.path} lists it: validate the capture")
    if not target.is_file():
        return _input_error(f"{captured} is not a file; the capture at {capture.path} lists it: validate the capture")
    a = _read_int32(Path(produced), rows * cols * 4, f"{what} as {rows} x {cols} int32")
    if isinstance(a, Comparison):
        return a
    try:
        spec_contract = _contract_of(capture.metadata, contract)
        residuals = capture.metadata.get("capture", {}).get("residuals", "model")
        recorded = capture.metadata.get("manifest_digest")
    except (KeyError, TypeError, AttributeError) as exc:
        return _input_error(f"{capture.path}: the manifest's metadata lacks {exc}; it is not a zkllm-hf capture")
    except ValueError as exc:
        return _input_error(f"{capture.path}: {exc}")
    if rows_digest(capture.manifest.to_pylist(), capture.metadata) != recorded:
        return Comparison(
            False,
            f"{capture.path}: the manifest was edited after capture (its digest does not match); run zkllm-hf "
            f"validate {shlex.quote(str(capture.path))}",
        )
    try:
        data = target.read_bytes()
    except OSError as exc:
        return _input_error(f"cannot read {captured}: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != int(row["byte_size"]) or digest != row["sha256"]:
        held = (
            f"holds {len(data)} bytes, the manifest says {row['byte_size']}"
            if len(data) != int(row["byte_size"])
            else f"has sha256 {digest[:16]}..., the manifest says {str(row['sha256'])[:16]}..."
        )
        return Comparison(
            False,
            f"{captured} {held}: the captured file changed after capture; run zkllm-hf validate "
            f"{shlex.quote(str(capture.path))}",
        )
    if len(data) != rows * cols * 4:
        return _input_error(f"{captured}: the manifest says {rows} x {cols} int32 in {len(data)} bytes; capture again")
    a = torch.from_numpy(a.reshape(rows, cols).astype(np.int64))
    b = torch.from_numpy(np.frombuffer(data, dtype="<i4").reshape(rows, cols).astype(np.int64))
    dev = (a - b).abs().to(torch.float64)
    spec = next((s for s in spec_contract.identities if s.kind == "sum" and s.lhs == row["point"]), None)
    exact = spec is None or residuals == "exact-int"
    if exact:
        tol = torch.zeros_like(dev)
        rule = "equal (exact)"
    else:
        params = {k: float(spec.params[k]) for k in ("quantisation_lsb", "rounding_ulps") if k in spec.params}
        dtype = _FLOAT_DTYPES.get(str(row["source_dtype"]))
        if dtype is None:
            return _input_error(f"{what}: the manifest's source_dtype {row['source_dtype']!r} is not a float type")
        tol = fp.sum_tolerance(b, dtype, int(row["scale_log2"]), **params)
        rule = f"within contract check {spec.name}'s tolerance"
    bad = dev > tol
    if not bool(bad.any()):
        return Comparison(
            True, f"{what}: {produced} matches {captured}, {rule}; max deviation {float(dev.max()):g} LSB"
        )
    ratio = torch.where(tol > 0, dev / tol.clamp(min=1e-300), torch.where(dev > 0, math.inf, 0.0))
    pos = int(torch.argmax(ratio.reshape(-1)))
    t, c = divmod(pos, cols)
    return Comparison(
        False,
        f"{what}: {produced} differs from {captured} at {int(bad.sum())} element(s), the worst at token {t}, "
        f"dim {c}: {int(a[t, c])} vs {int(b[t, c])} ({float(dev[t, c]):g} LSB, allowed {float(tol[t, c]):g}; {rule})",
    )


__all__ = [
    "GATE_LIMIT",
    "LLAMA2",
    "PLAN_MARK",
    "SCRATCH_MARK",
    "Comparison",
    "OutputRefused",
    "Plan",
    "PlanRefused",
    "check_out",
    "check_scratch",
    "compare_files",
    "is_plan_script",
    "prover_notes",
    "prover_problems",
    "write_plan_file",
    "write_script",
]
