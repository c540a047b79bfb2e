"""The bash script that proves a capture with zkLLM (:func:`write_script`), one small function per part of it:
the header, the helpers, the scratch folder, the one-time setup and each layer's steps.

Every step reads captured files, never the prover's own outputs; each input is checked before its step, each
step's log for zkLLM's success line, and each skip connection's output is compared with the capture.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contracts import inside
from ..provenance import utc_now
from ..version import __version__
from .limits import LAYER_PARAMS, LLAMA2, SCRIPTS, ZKLLM_SCALE_LOG2
from .output import SCRATCH_MARK, sign

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
    lines = _header(cap, plan) + _helpers(plan, python) + _scratch() + _setup(plan.model_size)
    for layer in plan.layers:
        lines += _layer(cap, plan, layer)
    lines += ["", f'echo "zkLLM proved layers {", ".join(map(str, plan.layers))} of $CAPTURE"', ""]
    return sign("\n".join(lines))


def _header(cap: Any, plan: Plan) -> list[str]:
    """The comment block: what is proved, where, and with --force the limits zkLLM will reject."""
    d, size = plan.capture, plan.model_size
    lines = [
        "#!/usr/bin/env bash",
        f"# Prove a zkllm-hf capture with zkLLM (jvhs0706/zkllm-ccs2024). Written by zkllm-hf {__version__} plan,",
        f"# {utc_now()}.",
        f"#   capture: {_c(d)} (seq_len {cap.seq_len}, hidden {cap.hidden_size}, residuals "
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
    return lines


def _helpers(plan: Plan, python: str) -> list[str]:
    """``set -euo pipefail``, the paths, and the shell functions every step uses (fail, need, made, step)."""
    return [
        "set -euo pipefail",
        "",
        f"ZKLLM_ROOT={_q(plan.zkllm_root)}",
        f"CAPTURE={_q(plan.capture)}",
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
    ]


def _scratch() -> list[str]:
    """The scratch folder made or re-used (only the script's own), the checkout checked, the capture re-validated."""
    return [
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
    ]


def _setup(size: int) -> list[str]:
    """The one-time, per-model steps: public parameters and weight commitments (skipped when they exist)."""
    pp = " ".join(f'"$WORKDIR/{p}-pp.bin"' for p in LAYER_PARAMS)
    return [
        "# One-time, per model: public parameters and weight commitments (skipped when their outputs exist).",
        f"WORKDIR=./zkllm-workdir/Llama-2-{size}b",
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


def _captured(cap: Any, plan: Plan, layer: int, point: str) -> str:
    """The quoted path of ``point``'s captured file: only a file inside the capture, never a row's text."""
    path = inside(plan.capture, str(cap.rows[(layer, point)]["file"]))
    if path is None or not path.is_file():
        raise ValueError(
            f"layer {layer} {point}: the manifest's file is not inside {plan.capture}; validate the capture"
        )
    return _q(path)


def _layer(cap: Any, plan: Plan, layer: int) -> list[str]:
    """One layer's steps in zkLLM's README order: RMSNorm, self-attention, skip 1, RMSNorm, FFN, skip 2."""
    n, size = cap.seq_len, plan.model_size

    def f(point: str) -> str:
        return _captured(cap, plan, layer, point)

    o = f'"$SCRATCH/layer-{layer}'
    block_input, norm_out = f("block_input"), f("input_layernorm_output")
    attn_out, residual = f("attn_output"), f("post_attn_residual")
    ffn_in, mlp_out, block_out = f("ffn_input"), f("mlp_output"), f("block_output")
    return [
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
