"""The model folder zkLLM loads (``zkllm-hf export-zkllm-model``): for grouped-query attention, the MHA model
with each key/value head's rows repeated per group, which computes the same function. Measured here: on the
same input its seven capture points are bit for bit the GQA model's, with sdpa and with eager attention."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.points import POINTS
from zkllm_hf.provenance import weights_fingerprint


def _files(folder, layers):
    return {(layer, p.name): (folder / p.file_name(layer)).read_bytes() for layer in layers for p in POINTS}


def _ids(n=24, vocab=15, seed=4):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_cli_export_of_a_gqa_capture_is_mha_and_proves_the_same_points(tiny_dir, tmp_path, capsys):
    """export-zkllm-model writes an MHA model (num_key_value_heads = num_attention_heads, k/v rows repeated
    per group, checked row by row against the GQA weights) whose capture of the same prompt has every file
    byte-identical to the GQA capture's; the record names both fingerprints."""
    from transformers import AutoModelForCausalLM

    text = "the quick brown fox jumps over the lazy dog"
    assert main(["capture", "--model", str(tiny_dir), "--text", text, "--out", str(tmp_path / "gqa"), "--quiet"]) == 0
    out = tmp_path / "zk model"
    assert main(["export-zkllm-model", str(tmp_path / "gqa"), str(out)]) == 0, capsys.readouterr().err
    gqa = AutoModelForCausalLM.from_pretrained(tiny_dir)
    mha = AutoModelForCausalLM.from_pretrained(out)
    h, kv = gqa.config.num_attention_heads, gqa.config.num_key_value_heads
    assert kv < h and mha.config.num_key_value_heads == h == mha.config.num_attention_heads
    d, g = gqa.config.hidden_size // h, h // kv
    for a, b in zip(gqa.model.layers, mha.model.layers):
        for proj in ("k_proj", "v_proj"):
            w, e = getattr(a.self_attn, proj).weight, getattr(b.self_attn, proj).weight
            assert e.shape == (h * d, gqa.config.hidden_size)
            for row in range(h * d):  # query head row // d uses key/value head (row // d) // g
                assert torch.equal(e[row], w[((row // d) // g) * d + row % d])
        assert torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight)
    assert main(["capture", "--model", str(out), "--text", text, "--out", str(tmp_path / "mha"), "--quiet"]) == 0
    layers = range(gqa.config.num_hidden_layers)
    assert _files(tmp_path / "gqa", layers) == _files(tmp_path / "mha", layers)
    record = json.loads((out / "zkllm-hf-export.json").read_text())
    cap_gqa = zkllm_hf.load_capture(tmp_path / "gqa").metadata["model"]
    cap_mha = zkllm_hf.load_capture(tmp_path / "mha").metadata["model"]
    assert record["source"]["weights_fingerprint"] == cap_gqa["weights_fingerprint"] == weights_fingerprint(gqa)
    assert record["weights_fingerprint"] == cap_mha["weights_fingerprint"] != cap_gqa["weights_fingerprint"]
    assert record["transformation"]["kind"] == "gqa-to-mha" and record["transformation"]["groups"] == g
    # the tokenizer travels with it, and a second export into the same folder is refused
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    capsys.readouterr()
    assert main(["export-zkllm-model", str(tmp_path / "gqa"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_expansion_is_bitwise_at_every_point(tmp_path, impl):
    from zkllm_hf.prove.export import expand_gqa

    gqa = make_tiny(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, intermediate_size=256)
    gqa.config._attn_implementation = impl
    mha, names = expand_gqa(gqa)
    assert len(names) == 2 * gqa.config.num_hidden_layers and gqa.config.num_key_value_heads == 2
    ids = _ids(200, 128)
    for name, m in (("gqa", gqa), ("mha", mha)):
        with torch.no_grad(), zkllm_hf.capture(m, tmp_path / name):
            m(ids)
    assert _files(tmp_path / "gqa", range(3)) == _files(tmp_path / "mha", range(3))


def test_export_refuses_a_model_that_is_not_the_captured_one(tmp_path):
    from zkllm_hf.errors import ExportRefused
    from zkllm_hf.prove.export import export_zkllm_model

    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "cap"):
        model(_ids(8, 128))
    other = make_tiny(seed=1)
    with pytest.raises(ExportRefused, match="not the captured one"):
        export_zkllm_model(other, zkllm_hf.load_capture(tmp_path / "cap"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_model_expansion_is_bitwise_at_every_point(real, tmp_path):
    """SmolLM2-135M (9 query heads, 3 key/value heads), float32 on the CPU, 64 tokens, all 30 layers."""
    from zkllm_hf.prove.export import expand_gqa

    model = real.model
    mha, _ = expand_gqa(model)
    ids = _ids(64, 1000)
    for name, m in (("gqa", model), ("mha", mha)):
        with torch.no_grad(), zkllm_hf.capture(m, tmp_path / name):
            m(ids)
    assert _files(tmp_path / "gqa", range(30)) == _files(tmp_path / "mha", range(30))
