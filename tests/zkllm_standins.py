"""Stand-ins for zkLLM's Python scripts, for tests/zkllm_stub.py to run against emulated binaries.

Written for this project from the observable interface of jvhs0706/zkllm-ccs2024 at commit 993311e (what each
script accepts, loads, touches on the model, prints, reads, writes and starts), not from its text; none of
zkLLM's code is reproduced. What each stand-in keeps, with the place in zkLLM's script it mirrors:

- the command line: the same positionals, types, choices and options, so argparse accepts and rejects what
  zkLLM's does (llama-ppgen.py:4-6, llama-commit.py:6-8, llama-rmsnorm.py:6-12, llama-self-attn.py:7-12,
  llama-ffn.py:6-11, llama-skip-connection.py:6-9);
- the order of work: ``make <target>`` first and exit 1 if it fails, then the arguments (e.g.
  llama-self-attn.py:27-31); llama-ffn.py writes its SwiGLU table before both (llama-ffn.py:24);
- the model loaded by its Hub name ``meta-llama/Llama-2-{size}b-hf`` with ``local_files_only=True`` and
  ``cache_dir="./model-storage"``, plus a tokenizer nobody uses in ppgen and commit (llama-ppgen.py:16-18,
  llama-commit.py:24-27) — only the launcher resolves that name to a folder;
- what they read off the model: layer 0's ``named_parameters()`` (llama-ppgen.py:22), every layer's
  (llama-commit.py:31-32), layer 0's ``{which}_layernorm`` weight and ``variance_epsilon`` whatever the layer
  argument says (llama-rmsnorm.py:27,33,38), ``self_attn.q_proj.in_features``, ``self_attn.num_heads``,
  ``self_attn.head_dim`` and ``self_attn.rotary_emb(x, position_ids) -> (cos, sin)`` (llama-self-attn.py:36,
  44-49) — transformers 5 has neither ``num_heads`` nor ``rotary_emb`` there, the launcher adds them — and
  layer 0's ``mlp.up_proj`` in/out features (llama-ffn.py:34-35);
- the ``os.system`` command lines, word for word, with their exit status ignored (llama-ppgen.py:31,
  llama-commit.py:44-46, llama-rmsnorm.py:45, llama-self-attn.py:40,74-75, llama-ffn.py:43,
  llama-skip-connection.py:26);
- the files: raw int32, weights transposed and scaled by ``1 << log_scaling_factor`` (llama-commit.py:33-43),
  activations by ``1 << 16``; ``rms_inv_temp.bin`` (llama-rmsnorm.py:37-39,47), ``temp_attn_out.bin`` from
  the integer-shifted softmax at 2**16 / 2**20 (llama-self-attn.py:42-73), ``swiglu-table.bin`` saved with the
  scaling factor 16 itself, not ``1 << 16`` (llama-ffn.py:16-19); random data written to a missing input
  (llama-rmsnorm.py:34-36, llama-ffn.py:40-41);
- what they print: ``Error compiling <target>``, commit's ``Max difference of Layer i, name: x``
  (llama-commit.py:38), skip-connection's ``Input or output file does not exist.`` (llama-skip-connection.py:23).

Two things differ on purpose: tensors live on the CPU (zkLLM uses CUDA device 0), and each script calls
``LOG`` (defined by zkllm_stub.install) once it has its model, or its arguments for skip-connection.
"""

# fileio_utils is imported by zkLLM's scripts from zkLLM's folder; this one offers what they use of it.
FILEIO = '''"""Stand-in for zkLLM's fileio_utils.py: int32 / int64 fixed-point helpers (the CPU as default device)."""
import numpy as np
import torch


def _bin_only(path):
    if not str(path).endswith(".bin"):
        raise ValueError(f"{path}: zkLLM files end with .bin")


def save_int(values, factor, path):
    """``values`` times ``factor``, rounded, written as raw int32."""
    _bin_only(path)
    fixed = torch.round(values * factor).to(torch.int32)
    fixed.detach().cpu().numpy().astype(np.int32).tofile(path)


def load_int(path, device="cpu"):
    _bin_only(path)
    return torch.from_numpy(np.fromfile(path, dtype=np.int32)).to(device)


def to_int64(values, bits):
    return torch.round(values.to(torch.float64) * (1 << bits)).to(torch.int64)


def to_float(values, bits, dtype=torch.float32):
    return (values / (1 << bits)).to(dtype)


def fromto_int64(values, bits, dtype=torch.float64):
    """``values`` snapped to the 2**-bits grid (always float64, as zkLLM's helper returns)."""
    return to_float(to_int64(values, bits), bits, torch.float64)
'''

PPGEN = '''"""Stand-in for zkLLM's llama-ppgen.py: generators for each kind of weight of layer 0."""
import argparse
import os

from transformers import AutoModelForCausalLM, AutoTokenizer

cli = argparse.ArgumentParser(description="stand-in for zkLLM's public-parameter generation")
cli.add_argument("model_size", type=int, choices=[7, 13], help="7 or 13 (billions)")
cli.add_argument("--log_off_factor", type=int, default=5, help="log2 of the extra generators per matrix row")


def generators_for(name, shape, log_off):
    if len(shape) == 2:
        return shape[0] << log_off
    if len(shape) == 1:
        return shape[0]
    raise ValueError(f"{name}: no generator count for a tensor of shape {tuple(shape)}")


def main():
    if os.system("make ppgen"):
        print("Error compiling ppgen")
        raise SystemExit(1)
    opts = cli.parse_args()
    hub_name = f"meta-llama/Llama-2-{opts.model_size}b-hf"
    AutoTokenizer.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    model = AutoModelForCausalLM.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    LOG(opts, model)
    workdir = f"./zkllm-workdir/Llama-2-{opts.model_size}b"
    os.makedirs(workdir, exist_ok=True)
    for pname, tensor in model.model.layers[0].named_parameters():
        count = generators_for(pname, tensor.shape, opts.log_off_factor)
        os.system(f"./ppgen {count} {workdir}/{pname}-pp.bin")


if __name__ == "__main__":
    main()
'''

COMMIT = '''"""Stand-in for zkLLM's llama-commit.py: every layer's weights in fixed point, each committed."""
import argparse
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

cli = argparse.ArgumentParser(description="stand-in for zkLLM's weight commitment")
cli.add_argument("model_size", type=int, choices=[7, 13], help="7 or 13 (billions)")
cli.add_argument("log_scaling_factor", type=int, help="weights are scaled by 2 to this power")


def write_int32(fixed, path):
    if not path.endswith(".bin"):
        raise ValueError(f"{path}: zkLLM files end with .bin")
    fixed.detach().cpu().numpy().astype(np.int32).tofile(path)


def main():
    if os.system("make commit-param"):
        print("Error compiling commit-param")
        raise SystemExit(1)
    opts = cli.parse_args()
    hub_name = f"meta-llama/Llama-2-{opts.model_size}b-hf"
    scale = 1 << opts.log_scaling_factor
    AutoTokenizer.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    model = AutoModelForCausalLM.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    LOG(opts, model)
    workdir = f"./zkllm-workdir/Llama-2-{opts.model_size}b"
    os.makedirs(workdir, exist_ok=True)
    for index, block in enumerate(model.model.layers):
        for pname, param in block.named_parameters():
            exact = param.float().T if param.dim() == 2 else param.float()  # matrices as (in, out)
            fixed = torch.round(exact * scale).to(torch.int32)
            worst = (fixed / scale - exact).abs().max().item()
            print(f"Max difference of Layer {index}, {pname}: {worst}")
            stem = f"{workdir}/layer-{index}-{pname}"
            write_int32(fixed, f"{stem}-int.bin")
            rows, cols = (fixed.shape[0], fixed.shape[1]) if fixed.dim() == 2 else (fixed.shape[0], 1)
            os.system(f"./commit-param {workdir}/{pname}-pp.bin {stem}-int.bin {stem}-commitment.bin {rows} {cols}")


if __name__ == "__main__":
    main()
'''

RMSNORM = '''"""Stand-in for zkLLM's llama-rmsnorm.py: 1/rms of each row for the rmsnorm binary."""
import argparse
import os

import fileio_utils
import numpy as np
import torch
from transformers import AutoModelForCausalLM

DEVICE = "cpu"  # zkLLM: CUDA device 0

cli = argparse.ArgumentParser(description="stand-in for zkLLM's RMSNorm step")
cli.add_argument("model_size", type=int, choices=[7, 13], help="7 or 13 (billions)")
cli.add_argument("layer", type=int, help="decoder layer whose weight the binary reads")
cli.add_argument("which", type=str, choices=["input", "post_attention"], help="which of the two norms")
cli.add_argument("seq_len", type=int, help="rows of the input")
cli.add_argument("--input_file", required=True, type=str, help="int32 input, (seq_len, hidden)")
cli.add_argument("--output_file", default="llama-rmsnorm-output.bin", type=str, help="where the binary writes")


def main():
    if os.system("make rmsnorm"):
        print("Error compiling rmsnorm")
        raise SystemExit(1)
    opts = cli.parse_args()
    hub_name = f"meta-llama/Llama-2-{opts.model_size}b-hf"
    model = AutoModelForCausalLM.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    LOG(opts, model)
    norm = getattr(model.model.layers[0], f"{opts.which}_layernorm")  # layer 0's, for its size and epsilon
    (width,) = norm.weight.shape
    if not os.path.isfile(opts.input_file):
        fileio_utils.save_int(torch.randn(opts.seq_len, width, device=DEVICE), 1 << 16, opts.input_file)
    raw = np.fromfile(opts.input_file, dtype=np.int32).reshape(opts.seq_len, width)
    rows = torch.tensor(raw, device=DEVICE, dtype=torch.float64) / (1 << 16)
    inverse_rms = torch.sqrt(rows.square().mean(dim=1) + norm.variance_epsilon).reciprocal()
    fileio_utils.save_int(inverse_rms, 1 << 16, "rms_inv_temp.bin")
    workdir = f"./zkllm-workdir/Llama-2-{opts.model_size}b"
    os.system(
        f"./rmsnorm {opts.which} {opts.input_file} {opts.seq_len} {width} {workdir} layer-{opts.layer} "
        f"{opts.output_file}"
    )
    os.remove("rms_inv_temp.bin")


if __name__ == "__main__":
    main()
'''

SELF_ATTN = '''"""Stand-in for zkLLM's llama-self-attn.py: Q/K/V from the binary, rotary and a causal softmax done in
fixed point here, the result handed back to the binary."""
import argparse
import math
import os

import torch
from fileio_utils import fromto_int64, load_int, save_int, to_float, to_int64
from transformers import AutoModelForCausalLM

DEVICE = "cpu"  # zkLLM: CUDA device 0
SCORE_BITS, SOFTMAX_BITS = 16, 20

cli = argparse.ArgumentParser(description="stand-in for zkLLM's self-attention step")
cli.add_argument("model_size", type=int, choices=[7, 13], help="7 or 13 (billions)")
cli.add_argument("layer", type=int, help="decoder layer")
cli.add_argument("seq_len", type=int, help="rows of the input")
cli.add_argument("--input_file", required=True, type=str, help="int32 input, (seq_len, hidden)")
cli.add_argument("--output_file", default="llama-self-attn-output.bin", type=str, help="where the binary writes")


def heads_of(path, seq_len, width, attn):
    """A (seq_len, width) int32 file as float (heads, seq_len, head_dim)."""
    flat = load_int(path, DEVICE).reshape(seq_len, width) / (1 << 16)
    return flat.view(seq_len, attn.num_heads, attn.head_dim).transpose(0, 1)


def rotated(t, cos, sin):
    half = t.shape[-1] // 2
    partner = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + partner * sin


def causal_softmax_times(q, k, v, head_dim):
    """softmax(q k^T / sqrt(head_dim)) v over the past, its exponent shifted in integers."""
    n = q.shape[-2]
    root = math.sqrt(head_dim)
    past = ~torch.triu(torch.ones(n, n, device=DEVICE, dtype=torch.bool), diagonal=1)
    scores = to_int64(q @ k.transpose(-2, -1), SCORE_BITS)
    scores -= (scores * past).amax(dim=-1, keepdim=True)
    total = (torch.exp(to_float(scores, SOFTMAX_BITS) / root) * past).sum(dim=-1, keepdim=True)
    scores -= to_int64(root * torch.log(total), SOFTMAX_BITS)
    weights = torch.exp(to_float(scores, SOFTMAX_BITS, torch.float64) / root).float() * past
    return fromto_int64(weights @ v, SCORE_BITS)


def main():
    if os.system("make self-attn"):
        print("Error compiling self-attn")
        raise SystemExit(1)
    opts = cli.parse_args()
    hub_name = f"meta-llama/Llama-2-{opts.model_size}b-hf"
    model = AutoModelForCausalLM.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    LOG(opts, model)
    attn = model.model.layers[opts.layer].self_attn
    n, width = opts.seq_len, attn.q_proj.in_features
    workdir = f"./zkllm-workdir/Llama-2-{opts.model_size}b"

    def prove(mode):
        os.system(f"./self-attn {mode} {opts.input_file} {n} {width} {workdir} layer-{opts.layer} {opts.output_file}")

    prove("linear")
    q, k, v = (heads_of(f"temp_{x}.bin", n, width, attn) for x in "QKV")
    attn.rotary_emb.to(DEVICE)
    cos, sin = attn.rotary_emb(torch.randn(1, n, width, device=DEVICE), torch.arange(n, device=DEVICE)[None])
    q, k = rotated(q, cos, sin).double(), rotated(k, cos, sin).double()
    mixed = causal_softmax_times(q, k, v, attn.head_dim)
    # heads back side by side, then zkLLM's transpose-and-reshape of that (seq_len, width) block
    mixed = mixed.transpose(0, 1).contiguous().view(n, width).transpose(0, 1).reshape(n, width)
    save_int(mixed, 1 << 16, "temp_attn_out.bin")
    prove("attn")
    os.system("rm ./temp*.bin")


if __name__ == "__main__":
    main()
'''

FFN = '''"""Stand-in for zkLLM's llama-ffn.py: the SwiGLU lookup table, then the ffn binary."""
import argparse
import os

import fileio_utils
import torch
from transformers import AutoModelForCausalLM

DEVICE = "cpu"  # zkLLM: CUDA device 0

cli = argparse.ArgumentParser(description="stand-in for zkLLM's FFN step")
cli.add_argument("model_size", type=int, choices=[7, 13], help="7 or 13 (billions)")
cli.add_argument("layer", type=int, help="decoder layer")
cli.add_argument("seq_len", type=int, help="rows of the input")
cli.add_argument("--input_file", required=True, type=str, help="int32 input, (seq_len, hidden)")
cli.add_argument("--output_file", default="llama-ffn-output.bin", type=str, help="where the binary writes")


def write_swiglu_table(range_bits=10, step_bits=12, out_factor=16):
    """x * sigmoid(x) on [-2**(range_bits-1), 2**(range_bits-1)) in steps of 2**-step_bits, times out_factor
    (zkLLM passes 16 here, the factor itself)."""
    half = 1 << (range_bits - 1)
    grid = torch.arange(-half, half, step=1 / (1 << step_bits), device=DEVICE)
    fileio_utils.save_int(grid * torch.sigmoid(grid), out_factor, "swiglu-table.bin")


def main():
    write_swiglu_table()
    if os.system("make ffn"):
        print("Error compiling ffn")
        raise SystemExit(1)
    opts = cli.parse_args()
    hub_name = f"meta-llama/Llama-2-{opts.model_size}b-hf"
    model = AutoModelForCausalLM.from_pretrained(hub_name, local_files_only=True, cache_dir="./model-storage")
    LOG(opts, model)
    up = model.model.layers[0].mlp.up_proj
    if not os.path.isfile(opts.input_file):
        fileio_utils.save_int(torch.randn(opts.seq_len, up.in_features, device=DEVICE), 1 << 16, opts.input_file)
    workdir = f"./zkllm-workdir/Llama-2-{opts.model_size}b"
    os.system(
        f"./ffn {opts.input_file} {opts.seq_len} {up.in_features} {up.out_features} {workdir} layer-{opts.layer} "
        f"{opts.output_file}"
    )
    os.remove("swiglu-table.bin")


if __name__ == "__main__":
    main()
'''

SKIP = '''"""Stand-in for zkLLM's llama-skip-connection.py: both files must exist, then the binary adds them."""
import argparse
import os

import fileio_utils  # noqa: F401  (imported, unused, as zkLLM's script does)
import transformers  # noqa: F401

cli = argparse.ArgumentParser(description="stand-in for zkLLM's skip connection")
cli.add_argument("--block_input_file", required=True, type=str, help="what entered the block")
cli.add_argument("--block_output_file", required=True, type=str, help="what the block produced")
cli.add_argument("--output_file", required=True, type=str, help="where their sum goes")


def main():
    if os.system("make skip-connection"):
        print("Error compiling skip-connection")
        raise SystemExit(1)
    opts = cli.parse_args()
    LOG(opts)
    if not all(os.path.isfile(p) for p in (opts.block_input_file, opts.block_output_file)):
        print("Input or output file does not exist.")
        raise SystemExit(1)
    os.system(f"./skip-connection {opts.block_input_file} {opts.block_output_file} {opts.output_file}")


if __name__ == "__main__":
    main()
'''

STANDINS = {
    "llama-ppgen.py": PPGEN,
    "llama-commit.py": COMMIT,
    "llama-rmsnorm.py": RMSNORM,
    "llama-self-attn.py": SELF_ATTN,
    "llama-ffn.py": FFN,
    "llama-skip-connection.py": SKIP,
    "fileio_utils.py": FILEIO,
}
