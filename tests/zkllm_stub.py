"""A stand-in zkLLM checkout for tests/test_prover_conformance.py: stand-ins for zkLLM's Python scripts
(tests/zkllm_standins.py, written from their interface, not copied) and its binaries emulated from their .cu
sources.

The scripts behave as zkLLM's do where the launcher is concerned: they parse zkLLM's arguments, load
``meta-llama/Llama-2-{7,13}b-hf`` by name (which only the launcher, ``python -m zkllm_hf.zkllm_run``, resolves),
read ``num_heads`` and ``rotary_emb`` (which only the launcher provides under transformers 5), write their
temporary files and call the binaries with ``os.system``. Each script logs one JSON line (its arguments, the
model folder it loaded, and whether ``os.system`` was the launcher's) to ``$ZKLLM_STUB_LOG``.

Each binary prints what its .cu source prints on success, in that order, and writes its output where the source
saves it (rmsnorm.cu:45-49, ffn.cu:81-93, self-attn.cu:61-73 and 102-119, skip-connection.cu:15-18,
commit-param.cu:18-28, ppgen.cu:8-9); it fails as the real one would on a missing weight file. Misbehaviour on
request: ``ZKLLM_STUB_KILL=NAME`` SIGKILLs binary NAME right after it saves its output, ``ZKLLM_STUB_OMIT=NAME``
makes it leave out its last success line (and exit 0), ``ZKLLM_STUB_BREAK=skip-connection`` writes a wrong sum.
``make`` (zkLLM's scripts build their binary first) is a stub on ``PATH`` that says the target is up to date.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from zkllm_standins import STANDINS

LOG_CALL = """
import json as _json, os as _os, sys as _sys
def LOG(args, model=None):
    with open(_os.environ["ZKLLM_STUB_LOG"], "a") as _f:
        _f.write(_json.dumps({"script": _os.path.basename(_sys.argv[0]), "argv": _sys.argv[1:], "args": vars(args),
                              "launched": bool(getattr(_os.system, "checked", False)),
                              "model_dir": None if model is None else model.config._name_or_path}) + "\\n")
"""

BINARY_HEAD = f"""#!{sys.executable}
import os, signal, sys
import numpy as np
NAME = os.path.basename(sys.argv[0])
RESCALED, OPENED = "Rescaling proof complete.", "Opening complete"
def say(*lines):
    for line in lines:
        print(line, flush=True)
def last(line):
    if os.environ.get("ZKLLM_STUB_OMIT") != NAME:
        say(line)
def saved():
    if os.environ.get("ZKLLM_STUB_KILL") == NAME:
        os.kill(os.getpid(), signal.SIGKILL)
def weight(workdir, prefix, name):
    for f in (f"{{workdir}}/{{name}}-pp.bin", f"{{workdir}}/{{prefix}}-{{name}}-int.bin",
              f"{{workdir}}/{{prefix}}-{{name}}-commitment.bin"):
        if not os.path.isfile(f):
            print(f"terminate called after throwing an instance of 'std::runtime_error'\\n  what():  no {{f}}")
            os.abort()
def ints(path):
    return np.fromfile(path, dtype=np.int32)
"""

BINARIES = {
    # rmsnorm.cu:19-24 reads the weight; :45 rs2.prove; :46 saves Y_; :48 rs1.prove; :49 verifyWeightClaim
    "rmsnorm": """which, inp, seq_len, embed_dim, workdir, prefix, out = sys.argv[1:8]
weight(workdir, prefix, f"{which}_layernorm.weight")
x, rms_inv = ints(inp), ints("rms_inv_temp.bin")
assert x.size == int(seq_len) * int(embed_dim) and rms_inv.size == int(seq_len)
say(RESCALED)
x.tofile(out); saved()
say(RESCALED)
last(OPENED)
""",
    # self-attn.cu linear: :61-63 three rescalings, :65-67 three openings, :69-71 temp files, :73;
    # attn: :93 and :100 temp files, :102-103 two rescalings, :119
    "self-attn": """mode, inp, seq_len, embed_dim, workdir, prefix, out = sys.argv[1:8]
n, d = int(seq_len), int(embed_dim)
if mode == "linear":
    for p in ("q_proj", "k_proj", "v_proj"):
        weight(workdir, prefix, f"self_attn.{p}.weight")
    x = ints(inp); assert x.size == n * d
    say(RESCALED, RESCALED, RESCALED, OPENED, OPENED, OPENED)
    for t in ("Q", "K", "V"):
        (x // 4).astype(np.int32).tofile(f"temp_{t}.bin")
    saved()
    last("QKV linear proof successfully verified!")
else:
    q = ints("temp_Q.bin"); assert q.size == n * d
    np.zeros(n * n, dtype=np.int64).tofile("temp_head_Y.bin")
    q.tofile("temp_head_out.bin"); saved()
    say(RESCALED, RESCALED)
    last("Self attention proof successfully verified!")
""",
    # ffn.cu:20-42 reads three weights; :81 saves down_out; :83 :86 rescalings, :84 opening, :87-88 SwiGLU,
    # :89 rescaling, :90 opening, :92 rescaling, :93 opening
    "ffn": """inp, seq_len, embed_dim, hidden_dim, workdir, prefix, out = sys.argv[1:8]
for p in ("up_proj", "gate_proj", "down_proj"):
    weight(workdir, prefix, f"mlp.{p}.weight")
assert os.path.isfile("swiglu-table.bin")
x = ints(inp); assert x.size == int(seq_len) * int(embed_dim)
(x.astype(np.int64) * 16).astype(np.int32).tofile(out); saved()
say(RESCALED, OPENED, RESCALED, "SwiGLU proof complete.", RESCALED, OPENED, RESCALED)
last(OPENED)
""",
    # skip-connection.cu:15-18: z = x + y in the field, saved; nothing printed
    "skip-connection": """x = ints(sys.argv[1]).astype(np.int64); y = ints(sys.argv[2]).astype(np.int64)
if x.size != y.size:
    print("terminate called after throwing an instance of 'std::runtime_error'\\n  what():  Incompatible dimensions")
    os.abort()
z = x + y
if os.environ.get("ZKLLM_STUB_BREAK") == NAME:
    z[len(z) // 2] += 1000
z.astype(np.int32).tofile(sys.argv[3]); saved()
""",
    # commit-param.cu:18-20 and 23-26 print, :28 saves the commitment
    "commit-param": """gen, param, out, in_dim, out_dim = sys.argv[1:6]
assert os.path.isfile(gen)
size = ints(param).size
say(f"Param size: {size}", f"In dim: {in_dim}", f"Out dim: {out_dim}", "Generator size: 1",
    f"Unpadded param size: {size}", f"Padded param size: {size}")
last(f"Commitment size: {in_dim}")
open(out, "wb").write(b"commitment")
""",
    # ppgen.cu:8-9: the generators, saved; nothing printed
    "ppgen": """open(sys.argv[2], "wb").write(b"generators" + sys.argv[1].encode()); saved()
""",
}

MAKE = """#!/bin/sh
echo "make: '$1' is up to date."
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def install(root: Path) -> dict[str, str]:
    """Write the stand-in checkout into ``root``; return the environment the script needs to find ``make``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in STANDINS.items():
        (root / name).write_text(text if name == "fileio_utils.py" else LOG_CALL + text)
    for name, body in BINARIES.items():
        _executable(root / name, BINARY_HEAD + body)
    bin_dir = root.parent / f"{root.name}-bin"
    bin_dir.mkdir(exist_ok=True)
    _executable(bin_dir / "make", MAKE)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
