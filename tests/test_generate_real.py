"""generate() capture on the real default model (SmolLM2-135M-Instruct, 30 layers): steps and full."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

import zkllm_hf
from zkllm_hf.cli import main

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Zero-knowledge proofs let a prover"]
K = 16


def q(x: torch.Tensor) -> np.ndarray:
    return torch.round(x.double() * 2**K).to(torch.int32).numpy()


@pytest.fixture(scope="module")
def generated(real, tmp_path_factory):
    """One generate() call with steps capture and HF's own hidden states, on a left-padded batch of two."""
    model, tok = real.model, real.tokenizer
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out_dir = tmp_path_factory.mktemp("gen") / "steps"
    with torch.no_grad(), zkllm_hf.CaptureLogitsProcessor(model, out_dir, mode="steps") as proc:
        out = model.generate(**batch, logits_processor=LogitsProcessorList([proc]), max_new_tokens=5,
                             do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
        proc.finalize(out)
    return out_dir, out, batch


def test_steps_match_hf_hidden_states_bit_for_bit(generated, real):
    out_dir, out, batch = generated
    ds = zkllm_hf.load_capture(out_dir)
    layers = real.model.config.num_hidden_layers
    prompt_len = batch["input_ids"].shape[1]
    for r in range(len(PROMPTS)):
        real_cols = batch["attention_mask"][r].bool()
        steps = sorted(k for (s, k) in ds.units if s == r)
        assert steps == list(range(len(out.hidden_states)))  # no EOS within 5 tokens here
        for k in steps:
            unit = ds.unit(r, k)
            cols = real_cols if k == 0 else slice(-1, None)
            tokens = out.sequences[r, :prompt_len][real_cols] if k == 0 else out.sequences[r, prompt_len + k - 1 :][:1]
            assert unit.metadata["tokens"]["input_ids"] == tokens.tolist()
            for layer in range(layers):
                hs_in = out.hidden_states[k][layer][r, cols]
                assert np.array_equal(np.asarray(unit.codes(layer, "block_input")), q(hs_in)), (r, k, layer)
                if layer:
                    assert np.array_equal(np.asarray(unit.codes(layer - 1, "block_output")), q(hs_in))
    assert zkllm_hf.validate(out_dir, model=real.model).ok


def test_full_equals_a_plain_capture_and_the_steps(generated, real, tmp_path):
    """full's forward over the returned sequence is a plain forward of those tokens, byte for byte; the
    KV-cached steps agree with it within float32 rounding."""
    steps_dir, out, batch = generated
    model, tok = real.model, real.tokenizer
    proc = zkllm_hf.CaptureLogitsProcessor(model, tmp_path / "full", mode="full", layers="0,15,29")
    with torch.no_grad(), proc:
        again = model.generate(**batch, logits_processor=LogitsProcessorList([proc]), max_new_tokens=5,
                               do_sample=False, pad_token_id=tok.pad_token_id)
        proc.finalize(again)
    assert torch.equal(again, out.sequences)
    full, steps = zkllm_hf.load_capture(tmp_path / "full"), zkllm_hf.load_capture(steps_dir)
    prompt_len = batch["input_ids"].shape[1]
    for r in range(len(PROMPTS)):
        seq = out.sequences[r, :prompt_len][batch["attention_mask"][r].bool()].tolist()
        seq += out.sequences[r, prompt_len:].tolist()
        unit = full.unit(r)
        assert unit.metadata["tokens"]["input_ids"] == seq
        with torch.no_grad(), zkllm_hf.capture(model, tmp_path / f"plain{r}", layers="0,15,29"):
            model(input_ids=torch.tensor([seq]))
        plain = zkllm_hf.load_capture(tmp_path / f"plain{r}")
        for row in plain.manifest.to_pylist():
            assert (tmp_path / f"plain{r}" / row["file"]).read_bytes() == (unit.path / row["file"]).read_bytes()
        for layer in (0, 15, 29):
            for point in ("block_input", "attn_output", "block_output"):
                chained = np.concatenate([np.asarray(steps.unit(r, k).codes(layer, point))
                                          for k in sorted(k for (s, k) in steps.units if s == r)])
                whole = np.asarray(unit.codes(layer, point))[: len(chained)].astype(np.int64)
                # float32 kernels differ between one row and many: a few ulps at each row's magnitude
                scale = np.abs(whole).max(axis=1, keepdims=True) / 2**K
                tol = 1 + 16 * np.spacing(scale.astype(np.float32)).astype(np.float64) * 2**K
                assert (np.abs(chained - whole) <= tol).all(), (r, layer, point)
    assert zkllm_hf.validate(tmp_path / "full", model=model).ok


def test_cli_generate_full_padded_batch(real, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "cli"
    code = main(["capture", "--batch-file", str(prompts), "--generate", "3", "--mode", "full", "--pad-to", "32",
                 "--layers", "0-1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    ds = zkllm_hf.load_capture(out)
    for r, text in enumerate(PROMPTS):
        tokens = ds.unit(r).metadata["tokens"]
        n_prompt = len(real.tokenizer(text).input_ids)
        assert tokens["seq_len"] == 32 and tokens["prompt_token_count"] == n_prompt
        assert tokens["input_ids"][:n_prompt] == real.tokenizer(text).input_ids
        tail = tokens["input_ids"][n_prompt + tokens["generated_token_count"] :]
        assert tail == [tokens["pad_token_id"]] * len(tail)
    assert main(["validate", str(out), "--model", "default"]) == 0
    assert main(["capture", "--text", "x", "--mode", "steps", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "--mode applies to --max-new-tokens" in capsys.readouterr().err
    assert main(["capture", "--text", "x", "--generate", "2", "--pad-to", "8", "--out", str(tmp_path / "z")]) == 2
    assert "--pad-to applies to --mode full" in capsys.readouterr().err
