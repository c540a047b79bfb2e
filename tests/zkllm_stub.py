"""Stand-ins for zkLLM's Python wrappers, for tests/test_prover_conformance.py.

Each stub declares the command-line interface its zkLLM script declares (the same positional arguments, types,
choices and required options, as zkLLM's scripts at jvhs0706/zkllm-ccs2024 993311e define them), so argparse
rejects exactly what the real script would. It then logs its call, checks that it runs from the zkLLM folder
(the real scripts resolve everything against the working directory), reads its inputs as zkLLM does
(``np.fromfile(path, int32).reshape(seq_len, embed_dim)``), prints the real script's success line and writes
its output file. ``llama-skip-connection.py`` computes ``z = x + y`` in the int domain, as the real binary
does. ``ZKLLM_STUB_HIDDEN`` stands for the embed_dim the real scripts read from the model they load;
``ZKLLM_STUB_BREAK`` names a script to misbehave (a wrong skip output, a missing success line).
"""

from __future__ import annotations

from pathlib import Path

HEADER = """import argparse, json, os, sys
import numpy as np
LOG = os.environ["ZKLLM_STUB_LOG"]
HIDDEN = int(os.environ["ZKLLM_STUB_HIDDEN"])
BROKEN = os.environ.get("ZKLLM_STUB_BREAK", "")
NAME = os.path.basename(__file__)
if not os.path.isfile("llama-rmsnorm.py"):
    print(f"{NAME}: not run from the zkLLM folder (cwd {os.getcwd()})"); sys.exit(1)
def log(args):
    with open(LOG, "a") as f:
        f.write(json.dumps({"script": NAME, "argv": sys.argv[1:], "args": vars(args)}) + "\\n")
def load(path, seq_len):
    return np.fromfile(path, dtype=np.int32).reshape(seq_len, HIDDEN)
"""

STUBS = {
    "llama-ppgen.py": """p = argparse.ArgumentParser()
p.add_argument("model_size", type=int, choices=[7, 13])
p.add_argument("--log_off_factor", type=int, default=5)
a = p.parse_args(); log(a)
w = f"./zkllm-workdir/Llama-2-{a.model_size}b"; os.makedirs(w, exist_ok=True)
for name in PARAMS:
    open(f"{w}/{name}-pp.bin", "wb").write(b"pp")
""",
    "llama-commit.py": """p = argparse.ArgumentParser()
p.add_argument("model_size", type=int, choices=[7, 13])
p.add_argument("log_scaling_factor", type=int)
a = p.parse_args(); log(a)
w = f"./zkllm-workdir/Llama-2-{a.model_size}b"; os.makedirs(w, exist_ok=True)
for i in range({7: 32, 13: 40}[a.model_size]):
    for name in PARAMS:
        open(f"{w}/layer-{i}-{name}-commitment.bin", "wb").write(b"c")
""",
    "llama-rmsnorm.py": """p = argparse.ArgumentParser()
p.add_argument("model_size", type=int, choices=[7, 13])
p.add_argument("layer", type=int)
p.add_argument("which", type=str, choices=["input", "post_attention"])
p.add_argument("seq_len", type=int)
p.add_argument("--input_file", required=True, type=str)
p.add_argument("--output_file", default="llama-rmsnorm-output.bin", type=str)
a = p.parse_args(); log(a)
x = load(a.input_file, a.seq_len)
x.tofile(a.output_file)
""",
    "llama-self-attn.py": """p = argparse.ArgumentParser()
p.add_argument("model_size", type=int, choices=[7, 13])
p.add_argument("layer", type=int)
p.add_argument("seq_len", type=int)
p.add_argument("--input_file", required=True, type=str)
p.add_argument("--output_file", default="llama-self-attn-output.bin", type=str)
a = p.parse_args(); log(a)
load(a.input_file, a.seq_len)
print("QKV linear proof successfully verified!")
if BROKEN != NAME:
    print("Self attention proof successfully verified!")
""",
    "llama-ffn.py": """p = argparse.ArgumentParser()
p.add_argument("model_size", type=int, choices=[7, 13])
p.add_argument("layer", type=int)
p.add_argument("seq_len", type=int)
p.add_argument("--input_file", required=True, type=str)
p.add_argument("--output_file", default="llama-ffn-output.bin", type=str)
a = p.parse_args(); log(a)
load(a.input_file, a.seq_len).tofile(a.output_file)
print("SwiGLU proof complete.")
""",
    "llama-skip-connection.py": """p = argparse.ArgumentParser()
p.add_argument("--block_input_file", required=True, type=str)
p.add_argument("--block_output_file", required=True, type=str)
p.add_argument("--output_file", required=True, type=str)
a = p.parse_args(); log(a)
if not os.path.isfile(a.block_input_file) or not os.path.isfile(a.block_output_file):
    print("Input or output file does not exist."); sys.exit(1)
x = np.fromfile(a.block_input_file, dtype=np.int32).astype(np.int64)
y = np.fromfile(a.block_output_file, dtype=np.int32).astype(np.int64)
z = x + y
if BROKEN == NAME:
    z[len(z) // 2] += 1000
z.astype(np.int32).tofile(a.output_file)
""",
}


def install(root: Path, params: tuple[str, ...]) -> None:
    """Write the six stubs into ``root`` (a stand-in zkLLM checkout)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, body in STUBS.items():
        (root / name).write_text(HEADER + f"PARAMS = {list(params)!r}\n" + body)
