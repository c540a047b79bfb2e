"""The bash script that proves a capture with zkLLM (:func:`write_script`), one small function per part of it:
the header, the helpers, the scratch folder, the one-time setup and each layer's steps.

Every step reads captured files, never the prover's own outputs; each input is checked before its step, each
step's log for zkLLM's success line, and each skip connection's output is compared with the capture.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..contracts import inside
from ..provenance import utc_now
from ..version import __version__
from .limits import LAYER_PARAMS, SCRIPTS, ZKLLM_SCALE_LOG2
from .output import SCRATCH_MARK, sign

# What each of zkLLM's binaries prints when it has finished, and how many times, read from its .cu source
# (jvhs0706/zkllm-ccs2024 993311e). A step passes only if its log holds each line exactly that many times, the
# launcher saw every binary exit 0, and no failure signature appears: a binary killed after it saved its output
# (rmsnorm.cu saves at line 46 and proves on until 49; ffn.cu saves at 81 and proves on until 93) never printed
# its last lines.
RESCALED = "Rescaling proof complete."  # rescaling.cu:77, the last statement of Rescaling::prove
OPENED = "Opening complete"  # proof.cu:9, the last statement of verifyWeightClaim
SUCCESS: dict[str, tuple[tuple[str, int], ...]] = {
    # rmsnorm.cu:45 rs2.prove, :48 rs1.prove (two rescalings), :49 verifyWeightClaim
    "rmsnorm": ((RESCALED, 2), (OPENED, 1)),
    # self-attn.cu, linear: :61-63 three rescalings, :65-67 three openings, :73; attn: :102-103 two rescalings, :119
    "self-attn": (
        (RESCALED, 5),
        (OPENED, 3),
        ("QKV linear proof successfully verified!", 1),
        ("Self attention proof successfully verified!", 1),
    ),
    # ffn.cu:83, :86, :89, :92 four rescalings; :84, :90, :93 three openings; :88
    "ffn": ((RESCALED, 4), (OPENED, 3), ("SwiGLU proof complete.", 1)),
    # skip-connection.cu:15-21 and ppgen.cu:4-11 print nothing: their exit status (through the launcher) and output
    "skip-connection": (),
    "ppgen": (),
}
COMMITTED = "Commitment size: "  # commit-param.cu:26, its last line, once per parameter llama-commit.py commits
COMMIT_PRINTED = "Max difference of Layer "  # llama-commit.py:38, once per parameter, before ./commit-param
# What a failure prints: an uncaught C++ exception, a Python error, a wrapper's own refusal, a signal's report.
FAILURE_PATTERN = (
    r"terminate called|what\(\):|Traceback \(most recent call last\)|Segmentation fault|Aborted|Killed|"
    r"core dumped|Bus error|Error compiling|Input or output file does not exist"
)


@dataclass(frozen=True)
class Plan:
    capture: Path  # absolute
    zkllm_root: Path  # absolute
    scratch: Path  # absolute; prover outputs and logs, never inside the capture
    model_dir: Path  # absolute; the folder every zkLLM script loads, through the launcher
    weights: str  # the weights fingerprint the model zkLLM loads must carry (the capture's or its expansion's)
    num_layers: int  # the model's layer count: llama-commit.py commits every layer
    model_size: int  # zkLLM's model_size argument: it names zkLLM's workdir only
    layers: list[int]
    warnings: list[str]  # limits zkLLM would reject (written only with --force)
    notes: list[str] = field(default_factory=list)  # header lines: the model zkLLM loads, the expansion
    budget: list[str] = field(default_factory=list)  # header lines: the proof budget, when one is given


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _c(text: object) -> str:
    """Text for a ``#`` comment: control characters escaped, so that no name can end the comment line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def write_script(cap: Any, plan: Plan, *, python: str = sys.executable) -> str:
    """The bash script that proves ``plan.layers`` of the capture with zkLLM, in zkLLM's README order."""
    lines = _header(cap, plan) + _helpers(plan, python) + _scratch() + _setup(plan)
    for layer in plan.layers:
        lines += _layer(cap, plan, layer)
    lines += ["", f'echo "zkLLM proved layers {", ".join(map(str, plan.layers))} of $CAPTURE"', ""]
    return sign("\n".join(lines))


def _header(cap: Any, plan: Plan) -> list[str]:
    """The comment block: what is proved, where, with which weights, and with --force the limits zkLLM rejects."""
    d = plan.capture
    fp = cap.metadata.get("model", {}).get("weights_fingerprint")
    lines = [
        "#!/usr/bin/env bash",
        f"# Prove a zkllm-hf capture with zkLLM (jvhs0706/zkllm-ccs2024). Written by zkllm-hf {__version__} plan,",
        f"# {utc_now()}.",
        f"#   capture: {_c(d)} (seq_len {cap.seq_len}, hidden {cap.hidden_size}, residuals "
        f"{_c(cap.metadata.get('capture', {}).get('residuals', 'model'))})",
        f"#   captured weights: {_c(fp)}",
        f"#   layers:  {', '.join(map(str, plan.layers))} (of {plan.num_layers})",
        f"#   zkLLM:   {_c(plan.zkllm_root)}; prover outputs and logs: {_c(plan.scratch)}",
        f"#   model zkLLM loads: {_c(plan.model_dir)}, weights {_c(plan.weights)}",
        *[f"#   {_c(n)}" for n in plan.notes],
        "# Every zkLLM script runs unchanged through python -m zkllm_hf.zkllm_run, which points its from_pretrained at",
        "# that folder, gives LlamaAttention the num_heads and rotary_emb transformers 5 removed, and fails on any",
        "# binary's non-zero exit or signal. Before any commitment, the folder's weights are checked against the",
        "# fingerprint above; each step's log must hold every line its .cu source prints on success, as many times;",
        "# each input is checked before its step and each skip output compared with the captured next point. Set",
        "# ZKLLM_PYTHON to zkLLM's Python (with zkllm-hf installed) if it is not the one that wrote this script.",
    ]
    if plan.budget:
        lines.append("#")
        lines += [f"# {_c(b)}" for b in plan.budget]
    if plan.warnings:
        lines.append("#")
        lines.append("# WARNING: written with --force; zkLLM will reject or mis-prove this capture as it stands:")
        for w in plan.warnings:
            lines.append(f"#   - {_c(w)}")
    return lines


def _helpers(plan: Plan, python: str) -> list[str]:
    """``set -euo pipefail``, the paths, and the shell functions every step uses (fail, need, made, step)."""
    return [
        "set -euo pipefail",
        "",
        f"ZKLLM_ROOT={_q(plan.zkllm_root)}",
        f"CAPTURE={_q(plan.capture)}",
        f"SCRATCH={_q(plan.scratch)}",
        f"MODEL_DIR={_q(plan.model_dir)}",
        f"WEIGHTS={_q(plan.weights)}",
        f'PY="${{ZKLLM_PYTHON:-{python}}}"',
        f"ZKLLM_HF=({_q(python)} -m zkllm_hf)",
        'ZKRUN=("$PY" -m zkllm_hf.zkllm_run --model-dir "$MODEL_DIR" --)',
        "",
        'fail() { echo "prove: $*" >&2; exit 1; }',
        'need() { local f; for f in "$@"; do [[ -f "$f" ]] || fail "missing input file: $f"; done; }',
        'made() { local f; for f in "$@"; do [[ -s "$f" ]] || fail "zkLLM wrote no $f"; done; }',
        "# step NAME LOG [COUNT:LINE]... -- COMMAND...: run it and keep its log; fail on its exit status, on a failure",
        "# signature, or on a success LINE its log does not hold exactly COUNT times.",
        "step() {",
        "  local name=$1 log=$2; shift 2",
        "  local -a success=()",
        '  while [[ $1 != -- ]]; do success+=("$1"); shift; done; shift',
        '  echo "== $name"',
        "  set +e",
        '  "$@" 2>&1 | tee "$log"',
        "  local rc=${PIPESTATUS[0]}",
        "  set -e",
        '  ((rc == 0)) || fail "$name failed with exit status $rc (see $log)"',
        f'  if grep -Eq {_q(FAILURE_PATTERN)} "$log"; then fail "$name failed (see $log)"; fi',
        "  local s want line n",
        '  for s in "${success[@]}"; do',
        "    want=${s%%:*} line=${s#*:}",
        '    n=$(grep -cF -- "$line" "$log" || true)',
        "    ((n == want)) || fail \"$name: zkLLM did not print '$line' $want time(s) but $n (see $log)\"",
        "  done",
        "}",
        "",
    ]


def _expect(binary: str) -> str:
    """The step's success arguments for ``binary``: ``COUNT:LINE`` each, quoted."""
    return " ".join(_q(f"{count}:{line}") for line, count in SUCCESS[binary])


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
        "# zkLLM's wrappers put their paths into shell commands unquoted (llama-rmsnorm.py:45, llama-self-attn.py:40",
        "# and 74, llama-ffn.py:43, llama-skip-connection.py:26), so a space or a $ in one would split or expand it:",
        "# they reach zkLLM through two links in a folder whose name needs no quoting.",
        'LINKS=$(mktemp -d)',
        '[[ $LINKS =~ ^[A-Za-z0-9_./-]+$ ]] || fail "mktemp -d made $LINKS, which zkLLM\'s unquoted commands would '
        'split; set TMPDIR to a plain path"',
        "trap 'rm -rf -- \"$LINKS\"' EXIT",
        'ln -s -- "$CAPTURE" "$LINKS/capture"',
        'ln -s -- "$SCRATCH" "$LINKS/scratch"',
        "",
    ]


def _setup(plan: Plan) -> list[str]:
    """The weights bound, then the one-time, per-model steps: public parameters and weight commitments, skipped
    only when their outputs exist and were made from these weights (a stamp in zkLLM's workdir says which)."""
    size, n = plan.model_size, plan.num_layers
    pp = " ".join(f'"$WORKDIR/{p}-pp.bin"' for p in LAYER_PARAMS)
    per_model = n * len(LAYER_PARAMS)
    return [
        "# The weights zkLLM will load carry the capture's fingerprint (or its recorded expansion's): checked in",
        "# zkLLM's Python, through the launcher, before anything is committed or proved.",
        'step weights "$SCRATCH/weights.log" "1:the model zkLLM loads carries weights fingerprint $WEIGHTS" -- '
        '"$PY" -m zkllm_hf.zkllm_run --model-dir "$MODEL_DIR" --weights "$WEIGHTS"',
        "",
        "# One-time, per model: public parameters and weight commitments, for every layer of the model.",
        f"WORKDIR=./zkllm-workdir/Llama-2-{size}b",
        'STAMP="$WORKDIR/zkllm-hf-weights.txt"',
        'have_all() { local f; for f in "$@"; do [[ -f "$f" ]] || return 1; done; }',
        "COMMITMENTS=()",
        f"for i in $(seq 0 {n - 1}); do",
        "  for p in " + " ".join(LAYER_PARAMS) + "; do",
        '    COMMITMENTS+=("$WORKDIR/layer-$i-$p-commitment.bin")',
        "  done",
        "done",
        f'if [[ -f $STAMP && $(cat -- "$STAMP") == "$WEIGHTS" ]] && have_all {pp} "${{COMMITMENTS[@]}}"; then',
        '  echo "== ppgen, commit: done before for these weights ($WORKDIR)"',
        "else",
        '  rm -f -- "$STAMP"',
        f'  step ppgen "$SCRATCH/ppgen.log" -- "${{ZKRUN[@]}}" llama-ppgen.py {size}',
        f'  have_all {pp} || fail "llama-ppgen.py wrote no public parameters into $WORKDIR"',
        f'  step commit "$SCRATCH/commit.log" {_q(f"{per_model}:{COMMIT_PRINTED}")} {_q(f"{per_model}:{COMMITTED}")} '
        f'-- "${{ZKRUN[@]}}" llama-commit.py {size} {ZKLLM_SCALE_LOG2}',
        '  have_all "${COMMITMENTS[@]}" || fail "llama-commit.py wrote no commitments into $WORKDIR"',
        '  echo "$WEIGHTS" >"$STAMP"',
        "fi",
    ]


SAFE_NAME = re.compile(r"[A-Za-z0-9_./-]+")


def _captured(cap: Any, plan: Plan, layer: int, point: str) -> tuple[str, str]:
    """``point``'s captured file (only a file inside the capture, never a row's text): its quoted path, and the
    path zkLLM is given, through ``$LINKS/capture``."""
    path = inside(plan.capture, str(cap.rows[(layer, point)]["file"]))
    if path is None or not path.is_file():
        raise ValueError(
            f"layer {layer} {point}: the manifest's file is not inside {plan.capture}; validate the capture"
        )
    rel = path.relative_to(plan.capture).as_posix()
    if not SAFE_NAME.fullmatch(rel):
        raise ValueError(f"layer {layer} {point}: file name {rel!r} would be split by zkLLM's unquoted commands")
    return _q(path), f'"$LINKS/capture/{rel}"'


def _layer(cap: Any, plan: Plan, layer: int) -> list[str]:
    """One layer's steps in zkLLM's README order: RMSNorm, self-attention, skip 1, RMSNorm, FFN, skip 2. Each
    file is named to zkLLM through $LINKS (its commands are unquoted), and checked here by its own path."""
    n, size = cap.seq_len, plan.model_size
    run = '"${ZKRUN[@]}"'
    files = {p: _captured(cap, plan, layer, p) for p in (
        "block_input", "input_layernorm_output", "attn_output", "post_attn_residual", "ffn_input", "mlp_output",
        "block_output")}
    f = {p: v[0] for p, v in files.items()}  # quoted paths, for the script's own checks
    z = {p: v[1] for p, v in files.items()}  # what zkLLM is given

    def o(name: str) -> str:
        return f'"$SCRATCH/layer-{layer}/{name}"'

    def zo(name: str) -> str:
        return f'"$LINKS/scratch/layer-{layer}/{name}"'

    return [
        "",
        f"# ---- layer {layer}",
        f'mkdir -p -- "$SCRATCH/layer-{layer}"',
        f"need {f['block_input']}",
        f"rm -f -- {o('rmsnorm-input.bin')}",
        f'step "layer {layer}: input RMSNorm" {o("rmsnorm-input.log")} {_expect("rmsnorm")} -- {run} llama-rmsnorm.py '
        f"{size} {layer} input {n} --input_file {z['block_input']} --output_file {zo('rmsnorm-input.bin')}",
        f"made {o('rmsnorm-input.bin')}",
        f"need {f['input_layernorm_output']}",
        f'step "layer {layer}: self-attention" {o("self-attn.log")} {_expect("self-attn")} -- {run} '
        f"llama-self-attn.py {size} {layer} {n} --input_file {z['input_layernorm_output']} "
        f"--output_file {zo('self-attn.bin')}",
        f"need {f['block_input']} {f['attn_output']}",
        f"rm -f -- {o('skip-1.bin')}",
        f'step "layer {layer}: skip connection 1" {o("skip-1.log")} -- {run} llama-skip-connection.py '
        f"--block_input_file {z['block_input']} --block_output_file {z['attn_output']} "
        f"--output_file {zo('skip-1.bin')}",
        f"made {o('skip-1.bin')}",
        f'"${{ZKLLM_HF[@]}}" compare {o("skip-1.bin")} {f["post_attn_residual"]} --tolerance-from "$CAPTURE" '
        f'|| fail "layer {layer}: skip connection 1 does not reproduce the captured post-attention residual"',
        f"need {f['post_attn_residual']}",
        f"rm -f -- {o('rmsnorm-post.bin')}",
        f'step "layer {layer}: post-attention RMSNorm" {o("rmsnorm-post.log")} {_expect("rmsnorm")} -- {run} '
        f"llama-rmsnorm.py {size} {layer} post_attention {n} --input_file {z['post_attn_residual']} "
        f"--output_file {zo('rmsnorm-post.bin')}",
        f"made {o('rmsnorm-post.bin')}",
        f"need {f['ffn_input']}",
        f"rm -f -- {o('ffn.bin')}",
        f'step "layer {layer}: FFN" {o("ffn.log")} {_expect("ffn")} -- {run} llama-ffn.py {size} {layer} {n} '
        f"--input_file {z['ffn_input']} --output_file {zo('ffn.bin')}",
        f"made {o('ffn.bin')}",
        f"need {f['post_attn_residual']} {f['mlp_output']}",
        f"rm -f -- {o('skip-2.bin')}",
        f'step "layer {layer}: skip connection 2" {o("skip-2.log")} -- {run} llama-skip-connection.py '
        f"--block_input_file {z['post_attn_residual']} --block_output_file {z['mlp_output']} "
        f"--output_file {zo('skip-2.bin')}",
        f"made {o('skip-2.bin')}",
        f'"${{ZKLLM_HF[@]}}" compare {o("skip-2.bin")} {f["block_output"]} --tolerance-from "$CAPTURE" '
        f'|| fail "layer {layer}: skip connection 2 does not reproduce the captured block output"',
    ]
