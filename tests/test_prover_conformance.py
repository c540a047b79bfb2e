"""Conformance with zkLLM: files read exactly as zkLLM's Python reads them, and the plan script run from another
folder against a stand-in zkLLM checkout (tests/zkllm_stub.py): stand-ins with the interface of zkLLM's scripts
(tests/zkllm_standins.py), through the launcher, with its binaries emulated from their .cu sources.

The model is tiny but zkLLM-sized where zkLLM's tables need it: hidden 1024 and intermediate 4096, so that
seq_len 1024 meets both the attention bound (a power of two >= 1024) and the FFN lookup bound
(next_pow2(seq_len x intermediate) >= 2**22). It is saved to a folder and loaded from there, so that its
capture names where it is (plan exports it for zkLLM from there).
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
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mha") / "model"
    make_tiny(**CONFIG).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


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
    return root, install(root)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
    """One stand-in checkout for the tests that only need ppgen and commit done once (the stamp skips them)."""
    root = tmp_path_factory.mktemp("shared") / "zkllm ccs"
    return root, install(root)


def _run(script: Path, stub_env: dict, log: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **stub_env,
        "ZKLLM_STUB_LOG": str(log),
        "ZKLLM_PYTHON": sys.executable,
        "HOME": "/nonexistent-home",  # an unquoted $HOME in a path would now point elsewhere
        **env,
    }
    return subprocess.run(["bash", str(script)], cwd=cwd, capture_output=True, text=True, env=env)


def _unlinked(path: str, capture: Path) -> str:
    """A path the script gave zkLLM, ``$LINKS/capture/NAME`` or ``$LINKS/scratch/...``, as what it points to."""
    import re

    assert re.fullmatch(r"[A-Za-z0-9_./-]+", path), path  # nothing zkLLM's unquoted os.system would split
    head, sep, tail = path.partition("/capture/")
    if sep and "/" not in tail:
        return str(capture / tail)
    head, sep, tail = path.partition("/scratch/")
    return f"SCRATCH/{tail}" if sep else path


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_plan_refuses_what_zkllm_would_reject_and_force_lists_it(model, stub_root, tmp_path):
    """The model's dims are no limit now (zkLLM loads the exported folder), zkLLM's tables still are: a
    16-token capture is refused for seq_len, and --force writes it with the limit in its header."""
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "short"):
        model(torch.randint(0, CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3)))
    out = tmp_path / "prove.sh"
    refused = _plan(tmp_path / "short", stub_root[0], out)
    assert refused.returncode == 1 and not out.exists() and not (tmp_path / "prove-model").exists()
    assert "seq_len 16 is not a power of two >= 1024" in refused.stderr and "Llama-2" not in refused.stderr
    forced = _plan(tmp_path / "short", stub_root[0], out, "--force")
    assert forced.returncode == 0, forced.stderr
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("seq_len 16 is not a power of two" in line for line in header)


def _script_paths(script: str) -> list[str]:
    """Every word of the script's commands, as bash would split them (comments dropped)."""
    words: list[str] = []
    for line in script.splitlines():
        if line.lstrip().startswith("#"):
            continue
        words += shlex.split(line, comments=True, posix=True)
    return words


@pytest.fixture(scope="module")
def zk_model(captures, tmp_path_factory):
    """The folder zkLLM loads for these captures (both are of one model), written once by export-zkllm-model."""
    from zkllm_hf.cli import main

    out = tmp_path_factory.mktemp("zk-model") / "model for zkLLM"
    assert main(["export-zkllm-model", str(captures["exact-int"]), str(out)]) == 0
    return out


PER_LAYER = [
    "llama-rmsnorm.py",
    "llama-self-attn.py",
    "llama-skip-connection.py",
    "llama-rmsnorm.py",
    "llama-ffn.py",
    "llama-skip-connection.py",
]


# (mode, layers the script proves): both layers once, and one layer in the default mode (each zkllm-hf call in
# the script costs a Python start with torch)
@pytest.mark.parametrize(("mode", "layers"), [("exact-int", [0, 1]), ("model", [1])])
def test_plan_script_runs_zkllm_steps_in_order_from_another_folder(
    captures, zk_model, stub_root, tmp_path, mode, layers
):
    """Without --force: every step is one of zkLLM's scripts, run unchanged through the launcher on the
    exported model, in zkLLM's README order, on the captured files; ppgen and commit cover every layer of the
    model and are skipped by a later script for the same weights."""
    root, stub_env = stub_root
    capture = captures[mode]
    out = tmp_path / "out dir" / "prove.sh"
    out.parent.mkdir()
    plan = _plan(capture, root, out, "--layers", ",".join(map(str, layers)), "--model-dir", str(zk_model))
    assert plan.returncode == 0, plan.stderr
    script = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)], capture_output=True).returncode == 0
    # every capture path is absolute, quoted (the folder's name holds a space, $HOME and quotes) and exists
    named = [w for w in _script_paths(script) if w.startswith(str(capture.parent))]
    assert named and all(Path(w).is_file() for w in named)
    commands = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert str(capture) not in commands.replace(shlex.quote(str(capture)), "")
    log = tmp_path / "calls.jsonl"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _run(out, stub_env, log, elsewhere)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    calls = _calls(log)
    assert [c["script"] for c in calls] == ["llama-ppgen.py", "llama-commit.py", *PER_LAYER * len(layers)]
    assert all(c["launched"] and c["model_dir"] in (str(zk_model), None) for c in calls)
    assert all(c["model_dir"] == str(zk_model) for c in calls if c["script"] != "llama-skip-connection.py")
    assert calls[1]["args"] == {"model_size": 7, "log_scaling_factor": 16}
    workdir = root / "zkllm-workdir" / "Llama-2-7b"
    committed = sorted(workdir.glob("layer-*-commitment.bin"))
    assert len(committed) == CONFIG["num_hidden_layers"] * len(LAYER_PARAMS)
    for i, layer in enumerate(layers):
        c = calls[2 + 6 * i : 8 + 6 * i]
        f = lambda point, layer=layer: str(file_of(capture, layer, point))  # noqa: E731
        for call in c:  # zkLLM is given each path through a link in a plain-named folder (its commands are unquoted)
            call["args"] = {k: _unlinked(v, capture) if k.endswith("_file") else v for k, v in call["args"].items()}
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
            assert target and target.startswith("SCRATCH/")
    # a later script skips the one-time steps, made for these weights
    if len(layers) > 1:
        log.unlink()
        again_plan = _plan(capture, root, out, "--layers", "1", "--overwrite", "--model-dir", str(zk_model))
        assert again_plan.returncode == 0, again_plan.stderr
        again = _run(out, stub_env, log, elsewhere)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [c["script"] for c in _calls(log)] == PER_LAYER


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZKLLM_STUB_BREAK": "skip-connection"}, "skip connection 1 does not reproduce"),
        # killed by the OOM killer right after saving its output (rmsnorm.cu:46, ffn.cu:81)
        ({"ZKLLM_STUB_KILL": "rmsnorm"}, "input RMSNorm failed with exit status 137"),
        ({"ZKLLM_STUB_KILL": "ffn"}, "FFN failed with exit status 137"),
        # a success line left out, exit status 0
        ({"ZKLLM_STUB_OMIT": "self-attn"}, "did not print 'QKV linear proof successfully verified!' 1 time(s) but 0"),
        ({"ZKLLM_STUB_OMIT": "ffn"}, "FFN: zkLLM did not print 'Opening complete' 3 time(s) but 2"),
        ({"ZKLLM_STUB_OMIT": "commit-param"}, "commit: zkLLM did not print 'Commitment size: ' 18 time(s) but 0"),
    ],
)
def test_plan_script_stops_when_zkllm_misbehaves(captures, zk_model, shared_root, stub_root, tmp_path, env, message):
    """zkLLM's wrappers exit 0 whatever their binaries did: the launcher fails on a binary's signal or exit
    status, and the script on a success line printed fewer times than the .cu source prints it, or a wrong
    skip output; it stops there and never reports the layer proved."""
    root, stub_env = stub_root if "commit-param" in env.values() else shared_root
    out = tmp_path / "prove.sh"
    plan = _plan(captures["exact-int"], root, out, "--layers", "0", "--model-dir", str(zk_model))
    assert plan.returncode == 0, plan.stderr
    run = _run(out, stub_env, tmp_path / "calls.jsonl", tmp_path, **env)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
    assert "zkLLM proved layers" not in run.stdout


def test_plan_script_refuses_a_missing_input_before_zkllm_writes_random_data(captures, zk_model, stub_root, tmp_path):
    """llama-rmsnorm.py and llama-ffn.py would write random data to a missing input path and prove it."""
    import shutil

    root, stub_env = stub_root
    capture = tmp_path / "copy"
    shutil.copytree(captures["model"], capture)
    out = tmp_path / "prove.sh"
    assert _plan(capture, root, out, "--layers", "1", "--model-dir", str(zk_model)).returncode == 0
    victim = file_of(capture, 1, "post_attn_residual")
    victim.unlink()
    run = _run(out, stub_env, tmp_path / "calls.jsonl", tmp_path)
    assert run.returncode != 0 and not victim.exists()
    assert "no longer validates" in run.stderr


def test_a_model_folder_with_other_weights_stops_the_script_before_ppgen(captures, zk_model, stub_root, tmp_path):
    """The folder zkLLM loads is checked in zkLLM's Python, through the launcher, against the fingerprint the
    export recorded: other weights put there after plan (same dims, same record) stop the script before
    ppgen, commit or any proof; and plan refuses an export of another model outright."""
    import shutil

    root, stub_env = stub_root
    folder = tmp_path / "swapped"
    shutil.copytree(zk_model, folder)
    out = tmp_path / "prove.sh"
    assert _plan(captures["model"], root, out, "--layers", "0", "--model-dir", str(folder)).returncode == 0
    record = (folder / "zkllm-hf-export.json").read_text()
    torch.manual_seed(1)
    make_tiny(seed=1, **CONFIG).save_pretrained(folder)  # another model's weights, the same config
    (folder / "zkllm-hf-export.json").write_text(record)
    log = tmp_path / "calls.jsonl"
    run = _run(out, stub_env, log, tmp_path)
    assert run.returncode != 0
    assert "weights failed with exit status 1" in run.stderr and "zkLLM would prove another model" in run.stdout
    assert _calls(log) == [] and not (root / "zkllm-workdir").exists()
    # an export whose record names another model is refused by plan
    other = json.loads(record)
    other["source"]["weights_fingerprint"] = "0" * 64
    (folder / "zkllm-hf-export.json").write_text(json.dumps(other))
    refused = _plan(captures["model"], root, tmp_path / "p2.sh", "--layers", "0", "--model-dir", str(folder))
    assert refused.returncode == 2 and "holds the export of another model" in refused.stderr


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


@pytest.mark.slow
def test_the_default_model_at_2048_goes_through_plan_and_every_step_through_the_launcher(
    model_cache, stub_root, tmp_path
):
    """SmolLM2-135M (grouped-query: 9 query heads, 3 key/value heads; 30 layers) captured at --pad-to 2048:
    plan accepts it without --force, exports its MHA expansion beside the script (both fingerprints in the
    header and the export's record), and the script runs every step of layer 0 through the launcher on that
    folder; commit covers all 30 of the model's layers."""
    root, stub_env = stub_root
    cap = tmp_path / "acts"
    captured = subprocess.run(
        [sys.executable, "-m", "zkllm_hf", "capture", "--text", "The quick brown fox jumps over the lazy dog.",
         "--pad-to", "2048", "--layers", "0", "--out", str(cap), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert captured.returncode == 0, captured.stderr[-2000:]
    out = tmp_path / "prove.sh"
    plan = _plan(cap, root, out)
    assert plan.returncode == 0, plan.stderr[-3000:]
    model_dir = tmp_path / "prove-model"
    record = json.loads((model_dir / "zkllm-hf-export.json").read_text())
    meta = zkllm_hf.load_capture(cap).metadata["model"]
    assert record["source"]["weights_fingerprint"] == meta["weights_fingerprint"]
    assert record["transformation"]["kind"] == "gqa-to-mha" and record["transformation"]["groups"] == 3
    header = "\n".join(line for line in out.read_text().splitlines() if line.startswith("#"))
    assert meta["weights_fingerprint"] in header and record["weights_fingerprint"] in header
    assert "WARNING" not in header
    log = tmp_path / "calls.jsonl"
    run = _run(out, stub_env, log, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    calls = _calls(log)
    assert [c["script"] for c in calls] == ["llama-ppgen.py", "llama-commit.py", *PER_LAYER]
    assert all(c["launched"] for c in calls)
    assert {c["model_dir"] for c in calls} == {str(model_dir), None}
    committed = list((root / "zkllm-workdir" / "Llama-2-7b").glob("layer-*-commitment.bin"))
    assert len(committed) == 30 * len(LAYER_PARAMS)
