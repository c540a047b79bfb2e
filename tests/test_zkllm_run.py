"""The launcher that runs zkLLM's own scripts under transformers 5 (``python -m zkllm_hf.zkllm_run``): what
``from_pretrained`` loads, the two attributes transformers removed from LlamaAttention, and ``os.system``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zkllm_hf.zkllm_run import zkllm_environment


def _zkllm_load():
    """What every zkLLM script does (llama-self-attn.py:32-34)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        "meta-llama/Llama-2-7b-hf", local_files_only=True, cache_dir="./model-storage"
    )


def test_from_pretrained_loads_the_folder_and_gives_back_the_removed_attributes(tiny_dir):
    """Inside the environment zkLLM's call loads the folder; each layer's self_attn has num_heads and a
    rotary_emb whose (cos, sin) are the rotary tables computed here from rope_theta, and applying them as
    llama-self-attn.py:51 does equals transformers' own rotation. Outside it, nothing is left patched."""
    import transformers
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with zkllm_environment(tiny_dir):
        model = _zkllm_load()
        tok = transformers.AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf", cache_dir="./model-storage")
    assert model.config._name_or_path == str(tiny_dir.resolve()) and tok is not None
    config = model.config
    heads, d, n = config.num_attention_heads, config.hidden_size // config.num_attention_heads, 40
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    inv = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]
    angles = torch.tensor([[p * f for f in inv] * 2 for p in range(n)], dtype=torch.float64)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.num_heads == heads and attn.num_heads * attn.head_dim == config.hidden_size
        cos, sin = attn.rotary_emb(torch.randn(1, n, config.hidden_size), torch.arange(n).unsqueeze(0))
        assert cos.shape == (1, n, d) and cos.dtype == torch.float32
        assert torch.allclose(cos[0].double(), angles.cos(), atol=1e-6)
        assert torch.allclose(sin[0].double(), angles.sin(), atol=1e-6)
        q = torch.randn(heads, n, d)
        half = torch.cat((-q[..., d // 2 :], q[..., : d // 2]), dim=-1)
        ours = q * cos + half * sin  # llama-self-attn.py:51
        theirs, _ = apply_rotary_pos_emb(q[None], q[None], cos, sin)
        assert torch.allclose(ours, theirs[0])
    # the shared rotary module is not part of the model's state
    assert not any("rotary_emb" in k and "self_attn" in k for k in model.state_dict())
    assert "from_pretrained" not in transformers.LlamaForCausalLM.__dict__
    assert not getattr(os.system, "checked", False)
    assert not hasattr(transformers.LlamaForCausalLM.from_pretrained(tiny_dir).model.layers[0].self_attn, "num_heads")


def test_a_folder_without_a_tokenizer_gives_none(tmp_path):
    """llama-ppgen.py:17 and llama-commit.py:26 load a tokenizer they never use."""
    import transformers
    from conftest import make_tiny

    make_tiny().save_pretrained(tmp_path / "m")
    with zkllm_environment(tmp_path / "m"):
        assert transformers.AutoTokenizer.from_pretrained("meta-llama/Llama-2-13b-hf") is None


@pytest.mark.parametrize(
    ("command", "code", "said"),
    [
        ("exit 3", 3, "exited with status 3"),
        ("kill -9 $$", 137, "SIGKILL"),
        ("kill -SEGV $$", 128 + 11, "SIGSEGV"),
    ],
)
def test_os_system_fails_on_a_non_zero_exit_or_a_signal(tiny_dir, capsys, command, code, said):
    """zkLLM's wrappers ignore what os.system returns (llama-rmsnorm.py:45 ...): inside the environment a
    failing or killed command raises SystemExit with 128 + the signal, naming it; success returns 0."""
    with zkllm_environment(tiny_dir):
        assert os.system("true") == 0
        with pytest.raises(SystemExit) as exc:
            os.system(command)
    assert exc.value.code == code and said in capsys.readouterr().err


def _launch(tmp_path, *args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "zkllm_hf.zkllm_run", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_the_launcher_runs_a_script_as_main_and_checks_the_weights(tiny_dir, tmp_path):
    """A script runs as __main__ from its folder with its own arguments; one whose binary is killed exits 137
    though the script ignores the status; --weights exits 1 on another fingerprint and 0 on the model's."""
    from transformers import AutoModelForCausalLM

    from zkllm_hf.provenance import weights_fingerprint

    (tmp_path / "helper.py").write_text("X = 7\n")
    (tmp_path / "s.py").write_text(
        "import os, sys\nfrom transformers import AutoModelForCausalLM\nimport helper\n"
        "if __name__ == '__main__':\n"
        "    m = AutoModelForCausalLM.from_pretrained('meta-llama/Llama-2-7b-hf', cache_dir='./model-storage')\n"
        "    print('ran', sys.argv[1:], helper.X, m.model.layers[0].self_attn.num_heads)\n"
        "    if sys.argv[1:] == ['kill']:\n"
        "        os.system('kill -9 $$')\n"
        "        print('carried on')\n"
    )
    ok = _launch(tmp_path, "--model-dir", str(tiny_dir), "--", "s.py", "a", "--b", cwd=tmp_path)
    assert ok.returncode == 0 and "ran ['a', '--b'] 7 4" in ok.stdout, ok.stderr[-2000:]
    killed = _launch(tmp_path, "--model-dir", str(tiny_dir), "--", "s.py", "kill", cwd=tmp_path)
    assert killed.returncode == 137 and "carried on" not in killed.stdout and "SIGKILL" in killed.stderr
    fp = weights_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype="auto"))
    assert _launch(tmp_path, "--model-dir", str(tiny_dir), "--weights", fp, cwd=tmp_path).returncode == 0
    wrong = _launch(tmp_path, "--model-dir", str(tiny_dir), "--weights", "0" * 64, cwd=tmp_path)
    assert wrong.returncode == 1 and "zkLLM would prove another model" in wrong.stderr
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    moved = _launch(tmp_path, "--model-dir", str(tiny_dir), "--", str(tmp_path / "s.py"), cwd=elsewhere)
    assert moved.returncode == 2 and "zkLLM folder" in moved.stderr


# Loads a model folder for zkLLM's Hub name with plain transformers (no launcher), optionally adding num_heads
# as the launcher does, then runs the script given as __main__.
_PLAIN = """import os, runpy, sys, transformers
real = transformers.AutoModelForCausalLM.from_pretrained
def load(_name, **_kwargs):
    model = real(os.environ["TINY"])
    if os.environ.get("ADD_HEADS"):
        for layer in model.model.layers:
            layer.self_attn.num_heads = model.config.num_attention_heads
    return model
transformers.AutoModelForCausalLM.from_pretrained = load
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_zkllms_self_attn_script_runs_only_through_the_launcher(tiny_dir, tmp_path):
    """The stand-in of llama-self-attn.py (tests/zkllm_standins.py, same interface as zkLLM's) under
    transformers 5: run plainly, the Hub name does not load; loaded from the folder, it stops at
    ``self_attn.num_heads``; given that, at ``self_attn.rotary_emb``; through the launcher it runs to its end."""
    import json

    import numpy as np
    from transformers import AutoConfig
    from zkllm_stub import install

    root = tmp_path / "zkllm"
    stub_env = install(root)
    workdir = root / "zkllm-workdir" / "Llama-2-7b"
    workdir.mkdir(parents=True)
    for p in ("q_proj", "k_proj", "v_proj"):  # what the emulated self-attn binary checks for
        for f in (f"self_attn.{p}.weight-pp.bin", f"layer-0-self_attn.{p}.weight-int.bin",
                  f"layer-0-self_attn.{p}.weight-commitment.bin"):
            (workdir / f).write_bytes(b"")
    n, width = 8, AutoConfig.from_pretrained(tiny_dir).hidden_size
    np.random.default_rng(0).integers(-65536, 65536, (n, width), dtype=np.int32).tofile(root / "in.bin")
    args = ["llama-self-attn.py", "7", "0", str(n), "--input_file", "in.bin"]
    log = tmp_path / "log.jsonl"
    env = {**os.environ, **stub_env, "PYTHONPATH": os.pathsep.join(sys.path), "ZKLLM_STUB_LOG": str(log),
           "HF_HUB_OFFLINE": "1", "TINY": str(tiny_dir)}

    def run(*cmd, **extra):
        return subprocess.run([sys.executable, *cmd], cwd=root, capture_output=True, text=True, env=env | extra)

    plain = run(*args)
    assert plain.returncode == 1 and "\nOSError: " in plain.stderr and "cached files" in plain.stderr, plain.stderr
    no_heads = run("-c", _PLAIN, *args)
    assert no_heads.returncode == 1 and "has no attribute 'num_heads'" in no_heads.stderr.splitlines()[-1]
    no_rotary = run("-c", _PLAIN, *args, ADD_HEADS="1")
    assert no_rotary.returncode == 1 and "has no attribute 'rotary_emb'" in no_rotary.stderr.splitlines()[-1]
    launched = run("-m", "zkllm_hf.zkllm_run", "--model-dir", str(tiny_dir), "--", *args)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "Self attention proof successfully verified!" in launched.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["launched"] for c in calls] == [False, False, True]  # the plain run never got its model
    assert not list(root.glob("temp*.bin"))  # the script's own clean-up ran (llama-self-attn.py:75)
