"""Conformance with zkLLM: files read exactly as zkLLM's Python reads them, and the plan script run against
stand-ins of zkLLM's wrappers (tests/zkllm_stub.py) from another folder.

The model is tiny but zkLLM-sized where zkLLM's tables need it: hidden 1024 and intermediate 4096, so that
seq_len 1024 meets both the attention bound (a power of two >= 1024) and the FFN lookup bound
(next_pow2(seq_len x intermediate) >= 2**22). It has full multi-head attention, as zkLLM's kernel requires.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny
from zkllm_stub import install

import zkllm_hf
from zkllm_hf.prove import LAYER_PARAMS

SEQ, HIDDEN, INTER = 1024, 1024, 4096
CONFIG = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=256,
    max_position_embeddings=2048,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_tiny(**CONFIG)


@pytest.fixture(scope="module")
def captures(model, tmp_path_factory):
    """One capture per residual mode, in a folder whose name needs quoting in a shell."""
    root = tmp_path_factory.mktemp("conformance") / "my captures $HOME 'q'"
    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(3))
    out = {}
    for mode in ("model", "exact-int"):
        with zkllm_hf.capture(model, root / mode, residuals=mode):
            model(ids)
        out[mode] = root / mode
    return out


def zk_read(path: Path) -> np.ndarray:
    """What zkLLM's fileio_utils.load_int and its scripts do: raw int32, reshaped (seq_len, embed_dim)."""
    return np.fromfile(path, dtype=np.int32).reshape(SEQ, HIDDEN)


def file_of(folder: Path, layer: int, point: str) -> Path:
    from zkllm_hf.points import POINTS

    return folder / next(p for p in POINTS if p.name == point).file_name(layer)


# --------------------------------------------------------------------------------------------------
# The files, as zkLLM's Python reads them


@pytest.mark.parametrize("layer", [0, 1])
def test_skip_connections_reproduce_the_next_point(captures, layer):
    """zkLLM's skip step computes z = x + y in the int domain. By default z equals the captured next point
    within the model's float rounding (1.5 LSB of quantisation plus half a float32 ulp of the sum); with
    exact-int residuals, bit for bit, and the layer chain holds byte for byte."""
    for mode, folder in captures.items():
        x = zk_read(file_of(folder, layer, "block_input")).astype(np.int64)
        a = zk_read(file_of(folder, layer, "attn_output")).astype(np.int64)
        r = zk_read(file_of(folder, layer, "post_attn_residual")).astype(np.int64)
        m = zk_read(file_of(folder, layer, "mlp_output")).astype(np.int64)
        o = zk_read(file_of(folder, layer, "block_output")).astype(np.int64)
        for z, captured in ((x + a, r), (r + m, o)):
            if mode == "exact-int":
                assert np.array_equal(z, captured)
            else:
                value = np.abs(captured).astype(np.float64) / 2**16
                half_ulp = 0.5 * np.spacing(value.astype(np.float32)).astype(np.float64) * 2**16
                assert (np.abs(z - captured) <= 1.5 + half_ulp).all()
        if layer == 0:
            assert file_of(folder, 0, "block_output").read_bytes() == file_of(folder, 1, "block_input").read_bytes()
    # the default files are the model's own values: the int sum is not exact everywhere
    folder = captures["model"]
    x, a, r = (
        zk_read(file_of(folder, 1, p)).astype(np.int64) for p in ("block_input", "attn_output", "post_attn_residual")
    )
    assert not np.array_equal(x + a, r)


def _zkllm_rmsnorm(x_codes: np.ndarray, weight: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """llama-rmsnorm.py and rmsnorm.cu on one input file: rms_inv in float64 from the quantised input, then
    the int pipeline (g = rms_inv (x) w at 2**32, rescaled half up to 2**16; Y = g * X, rescaled)."""
    X = torch.tensor(x_codes, dtype=torch.float64) / (1 << 16)
    rms_inv = 1 / torch.sqrt(torch.mean(X**2, dim=1) + eps)
    rq = torch.round(rms_inv * (1 << 16)).to(torch.int64)  # fileio_utils.save_int
    wq = torch.round(torch.tensor(weight, dtype=torch.float32) * (1 << 16)).to(torch.int64)  # llama-commit.py
    g = rq[:, None] * wq[None, :]
    g_ = torch.div(g + (1 << 15), 1 << 16, rounding_mode="floor")  # Rescaling rounds half up
    y = g_ * torch.tensor(x_codes, dtype=torch.int64)
    y_ = torch.div(y + (1 << 15), 1 << 16, rounding_mode="floor")
    return y_.numpy(), rms_inv.numpy()


@pytest.mark.parametrize("which", ["input", "post_attention"])
def test_zkllm_rmsnorm_on_the_files_reproduces_the_captured_norm(captures, model, which):
    """zkLLM's RMSNorm, run on the captured input file with the layer's weight, lands on the captured output
    within zkLLM's own fixed-point error (rms_inv, the weight and two rescalings each round by half an LSB),
    and not on another point's file."""
    folder = captures["model"]
    inp, out = ("block_input", "input_layernorm_output") if which == "input" else ("post_attn_residual", "ffn_input")
    for layer in (0, 1):
        norm = getattr(model.model.layers[layer], f"{which}_layernorm")
        w = norm.weight.detach().numpy()
        x = zk_read(file_of(folder, layer, inp))
        y_zk, rms_inv = _zkllm_rmsnorm(x, w, norm.variance_epsilon)
        xr = np.abs(x.astype(np.float64)) / 2**16
        bound = 0.5 * (xr * (np.abs(w)[None, :] + rms_inv[:, None] + 1) + rms_inv[:, None] * np.abs(w)[None, :]) + 2
        y = zk_read(file_of(folder, layer, out)).astype(np.int64)
        assert (np.abs(y_zk - y) <= bound).all()
        other = zk_read(file_of(folder, layer, "attn_output")).astype(np.int64)
        assert not (np.abs(y_zk - other) <= bound).all()


# --------------------------------------------------------------------------------------------------
# The plan script, run against stand-ins of zkLLM's wrappers


def _plan(capture: Path, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zkllm_hf", "plan", str(capture), "--zkllm-root", str(root), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture
def stub_root(tmp_path):
    root = tmp_path / "zkllm ccs"
    install(root, LAYER_PARAMS)
    return root


def test_plan_refuses_what_zkllm_would_reject_and_force_lists_it(captures, stub_root, tmp_path):
    out = tmp_path / "prove.sh"
    refused = _plan(captures["model"], stub_root, out)
    assert refused.returncode == 1 and not out.exists()
    assert "Llama-2-7b-hf" in refused.stderr and "hidden_size 1024 (Llama-2-7B: 4096)" in refused.stderr
    forced = _plan(captures["model"], stub_root, out, "--force")
    assert forced.returncode == 0, forced.stderr
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("hidden_size 1024 (Llama-2-7B: 4096)" in line for line in header)
    assert any(line.startswith("# NOTE: the capture's model is") for line in header)  # zkLLM proves Llama-2's


def test_plan_notes_that_zkllm_proves_with_llama2_weights():
    from types import SimpleNamespace

    from zkllm_hf.prove import prover_notes

    def cap(name):
        return SimpleNamespace(metadata={"model": {"name_or_path": name}})

    assert prover_notes(cap("meta-llama/Llama-2-7b-hf"), 7) == []
    assert prover_notes(cap("/models/llama_2_13b_hf"), 13) == []
    assert "meta-llama/Llama-2-13b-hf" in prover_notes(cap("meta-llama/Llama-2-7b-hf"), 13)[0]
    assert "lmsys/vicuna-7b" in prover_notes(cap("lmsys/vicuna-7b"), 7)[0]


def _script_paths(script: str) -> list[str]:
    """Every word of the script's commands, as bash would split them (comments dropped)."""
    words: list[str] = []
    for line in script.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words += shlex.split(line, comments=True, posix=True)
    return words


# (mode, layers the script proves): both layers once, and one layer in the default mode (each zkllm-hf call in
# the script costs a Python start with torch; the stubs are cheap)
@pytest.mark.parametrize(("mode", "layers"), [("exact-int", [0, 1]), ("model", [1])])
def test_plan_script_runs_zkllm_steps_in_order_from_another_folder(captures, stub_root, tmp_path, mode, layers):
    capture = captures[mode]
    out = tmp_path / "out dir" / "prove.sh"
    out.parent.mkdir()
    plan = _plan(capture, stub_root, out, "--force", "--layers", ",".join(map(str, layers)))
    assert plan.returncode == 0, plan.stderr
    script = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)], capture_output=True).returncode == 0
    # every capture path is absolute, quoted (the folder's name holds a space, $HOME and quotes) and exists
    named = [w for w in _script_paths(script) if w.startswith(str(capture.parent))]
    assert named and all(Path(w).is_file() for w in named)
    commands = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert str(capture) not in commands.replace(shlex.quote(str(capture)), "")
    log = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "ZKLLM_STUB_LOG": str(log),
        "ZKLLM_STUB_HIDDEN": str(HIDDEN),
        "ZKLLM_PYTHON": sys.executable,
        "HOME": "/nonexistent-home",  # an unquoted $HOME in a path would now point elsewhere
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(["bash", str(out)], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    per_layer = [
        "llama-rmsnorm.py",
        "llama-self-attn.py",
        "llama-skip-connection.py",
        "llama-rmsnorm.py",
        "llama-ffn.py",
        "llama-skip-connection.py",
    ]
    assert [c["script"] for c in calls] == ["llama-ppgen.py", "llama-commit.py", *per_layer * len(layers)]
    assert calls[1]["args"] == {"model_size": 7, "log_scaling_factor": 16}
    for i, layer in enumerate(layers):
        c = calls[2 + 6 * i : 8 + 6 * i]
        f = lambda point, layer=layer: str(file_of(capture, layer, point))  # noqa: E731
        assert c[0]["args"] | {"output_file": None} == {
            "model_size": 7,
            "layer": layer,
            "which": "input",
            "seq_len": SEQ,
            "input_file": f("block_input"),
            "output_file": None,
        }
        assert c[1]["args"]["input_file"] == f("input_layernorm_output") and c[1]["args"]["seq_len"] == SEQ
        assert (c[2]["args"]["block_input_file"], c[2]["args"]["block_output_file"]) == (
            f("block_input"),
            f("attn_output"),
        )
        assert c[3]["args"]["which"] == "post_attention" and c[3]["args"]["input_file"] == f("post_attn_residual")
        assert c[4]["args"]["input_file"] == f("ffn_input")
        assert (c[5]["args"]["block_input_file"], c[5]["args"]["block_output_file"]) == (
            f("post_attn_residual"),
            f("mlp_output"),
        )
        for call in c:  # prover outputs go to scratch, never into the capture
            target = call["args"].get("output_file")
            assert target and not target.startswith(str(capture))
    # a later script skips the one-time steps, whose outputs now exist
    if len(layers) > 1:
        log.unlink()
        assert _plan(capture, stub_root, out, "--force", "--layers", "1", "--overwrite").returncode == 0
        again = subprocess.run(["bash", str(out)], cwd=elsewhere, capture_output=True, text=True, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [json.loads(line)["script"] for line in log.read_text().splitlines()] == per_layer


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("llama-skip-connection.py", "skip connection 1 does not reproduce"),
        ("llama-self-attn.py", "did not print 'Self attention proof successfully verified!'"),
    ],
)
def test_plan_script_stops_when_zkllm_misbehaves(captures, stub_root, tmp_path, broken, message):
    """zkLLM's wrappers exit 0 whatever happened: the script catches a wrong skip output and a missing
    success line itself, and stops there."""
    out = tmp_path / "prove.sh"
    assert _plan(captures["exact-int"], stub_root, out, "--force", "--layers", "0").returncode == 0
    env = {
        **os.environ,
        "ZKLLM_STUB_LOG": str(tmp_path / "calls.jsonl"),
        "ZKLLM_STUB_HIDDEN": str(HIDDEN),
        "ZKLLM_PYTHON": sys.executable,
        "ZKLLM_STUB_BREAK": broken,
    }
    run = subprocess.run(["bash", str(out)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode != 0
    assert message in run.stderr


def test_plan_script_refuses_a_missing_input_before_zkllm_writes_random_data(captures, stub_root, tmp_path):
    """llama-rmsnorm.py and llama-ffn.py would write random data to a missing input path and prove it."""
    import shutil

    capture = tmp_path / "copy"
    shutil.copytree(captures["model"], capture)
    out = tmp_path / "prove.sh"
    assert _plan(capture, stub_root, out, "--force", "--layers", "1").returncode == 0
    victim = file_of(capture, 1, "post_attn_residual")
    victim.unlink()
    env = {
        **os.environ,
        "ZKLLM_STUB_LOG": str(tmp_path / "calls.jsonl"),
        "ZKLLM_STUB_HIDDEN": str(HIDDEN),
        "ZKLLM_PYTHON": sys.executable,
    }
    run = subprocess.run(["bash", str(out)], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode != 0 and not victim.exists()
    assert "no longer validates" in run.stderr


def test_compare_names_the_place_and_the_tolerance(captures, tmp_path):
    from zkllm_hf.cli import main

    folder = captures["model"]
    x = zk_read(file_of(folder, 0, "block_input")).astype(np.int64)
    a = zk_read(file_of(folder, 0, "attn_output")).astype(np.int64)
    produced = tmp_path / "z.bin"
    (x + a).astype(np.int32).tofile(produced)
    target = file_of(folder, 0, "post_attn_residual")
    assert main(["compare", str(produced), str(target), "--tolerance-from", str(folder)]) == 0
    z = x + a
    z[5, 7] += 40
    z.astype(np.int32).tofile(produced)
    assert main(["compare", str(produced), str(target), "--tolerance-from", str(folder)]) == 1
    # exact-int: one LSB off is a mismatch
    ex = captures["exact-int"]
    z = zk_read(file_of(ex, 0, "block_input")).astype(np.int64) + zk_read(file_of(ex, 0, "attn_output"))
    z.astype(np.int32).tofile(produced)
    assert main(["compare", str(produced), str(file_of(ex, 0, "post_attn_residual")), "--tolerance-from", str(ex)]) == 0
    z[0, 0] += 1
    z.astype(np.int32).tofile(produced)
    assert main(["compare", str(produced), str(file_of(ex, 0, "post_attn_residual")), "--tolerance-from", str(ex)]) == 1


def test_gate_range_is_recorded_and_plan_refuses_beyond_the_swiglu_table(tmp_path, capsys):
    """The recorded largest |gate_proj output| per layer equals the one a plain hook sees; a layer at or past
    zkLLM's SwiGLU table (|gate| < 512) makes plan refuse, naming the layer."""
    from zkllm_hf.cli import main
    from zkllm_hf.validate import load_capture

    model = make_tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.mul_(2000.0)
    seen: dict[int, float] = {}
    handles = [
        layer.mlp.gate_proj.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, max(seen.get(i, 0.0), float(out.abs().max())))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "cap"):
        model(torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5)))
    for h in handles:
        h.remove()
    recorded = {g["layer"]: g["value"] for g in load_capture(tmp_path / "cap").metadata["ffn"]["gate_abs_max"]}
    assert recorded == seen and recorded[1] >= 512 > recorded[0]
    assert main(["plan", str(tmp_path / "cap"), "--zkllm-root", str(tmp_path), "--layers", "1"]) == 1
    err = capsys.readouterr().err
    assert f"|gate_proj output| reaches {recorded[1]:.6g} at layer 1" in err
    assert main(["plan", str(tmp_path / "cap"), "--zkllm-root", str(tmp_path), "--layers", "0"]) == 1
    assert "gate_proj" not in capsys.readouterr().err  # layer 0 is within the table: not named
