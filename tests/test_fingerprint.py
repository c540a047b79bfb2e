"""The weights fingerprint: what the weights mean, stable across bitsandbytes' repacking, and side-effect free."""

from __future__ import annotations

import pytest
import torch
from conftest import digest_of, make_tiny, tiny_ids
from test_capture import run_capture
from test_validate import rewrite_manifest

import zkllm_hf
from zkllm_hf import provenance
from zkllm_hf.provenance import FINGERPRINT_ALGORITHM, cached_fingerprint, weights_fingerprint


def _bnb_model(folder, kind: str, **kw):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not (folder / "config.json").exists():
        make_tiny().save_pretrained(folder)
    cfg = BitsAndBytesConfig(load_in_4bit=True, **kw) if kind == "4bit" else BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map={"": "cpu"}).eval()


QUANT = [
    ("4bit", {}),
    ("4bit", {"bnb_4bit_quant_type": "nf4"}),
    ("4bit", {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
    ("8bit", {}),
]
QUANT_IDS = ["fp4", "nf4", "nf4-double", "int8"]


@pytest.mark.parametrize(("kind", "kw"), QUANT, ids=QUANT_IDS)
def test_quantized_fingerprint_is_the_same_before_and_after_the_first_forward(kind, kw, tmp_path):
    """Defect: on CPU, bitsandbytes 0.50 repacks a 4-bit layer's quant state (absmax to bfloat16, transposed)
    in its first forward, so the fingerprint of one in-memory model changed across that forward and
    ``validate(dir, model=model)`` on the model that made the capture reported a mismatch. The fingerprint of
    a freshly loaded copy of the same checkpoint must be that one too."""
    model = _bnb_model(tmp_path / "tiny", kind, **kw)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model(tiny_ids())
    assert weights_fingerprint(model) == before
    assert weights_fingerprint(_bnb_model(tmp_path / "tiny", kind, **kw)) == before


@pytest.mark.parametrize(("kind", "kw"), QUANT, ids=QUANT_IDS)
def test_fingerprinting_does_not_change_what_the_model_computes(kind, kw, tmp_path):
    """Defect: ``model.state_dict()`` on a CPU-repacked bitsandbytes 4-bit layer undoes the packing but leaves
    absmax in the packed layout, so the next forward computed other logits: fingerprinting (or validating
    with) a model changed the model."""
    model = _bnb_model(tmp_path / "tiny", kind, **kw)
    ids = tiny_ids()
    with torch.no_grad():
        first = model(ids).logits
        weights_fingerprint(model)
        again = model(ids).logits
    assert torch.equal(first, again)


@pytest.mark.parametrize(("kind", "kw"), QUANT, ids=QUANT_IDS)
@pytest.mark.parametrize("after_forward", [False, True])
def test_quantized_fingerprint_sees_a_changed_weight(kind, kw, after_forward, tmp_path):
    """The fingerprint is not blind to the quantized weights: one changed code, or one changed scale, changes
    it, before and after bitsandbytes repacks."""
    for change in ("code", "scale"):
        model = _bnb_model(tmp_path / "tiny", kind, **kw)
        if after_forward:
            with torch.no_grad():
                model(tiny_ids())
        before = weights_fingerprint(model)
        layer = model.model.layers[1].mlp.down_proj
        with torch.no_grad():
            codes = layer.weight.data.view(-1)
            if change == "code" and kind == "4bit":
                codes[5] ^= 0x11  # both 4-bit codes of one byte, whatever the packing
            elif change == "code":
                codes[5] += 1 if codes[5] < 100 else -1
            elif kind == "4bit":
                qs = layer.weight.quant_state
                (qs.state2.absmax if qs.nested else qs.absmax).view(-1)[0] *= 2
            else:
                scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
                scb.view(-1)[0] *= 2
        assert weights_fingerprint(model) != before, change


def _old_fingerprint(model, algorithm: str = "sha256") -> str:
    """The fingerprint as FINGERPRINT_ALGORITHM defined it before quantized weights were canonicalised (v2,
    sha256; v3 is the same lines under blake3), recomputed here from model.state_dict() (independent of
    zkllm_hf.provenance)."""
    lines = []
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().contiguous().reshape(-1)
        digest = digest_of(algorithm, flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        lines.append(f"{name}|{t.dtype}|{list(t.shape)}|{digest}")
    return digest_of(algorithm, "\n".join(lines).encode())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_unquantized_fingerprint_keeps_its_definition(dtype, tied):
    """An unquantized model's fingerprint is what it always was (v2, under sha256), so captures made before
    stay valid; the default v3 is the same definition under blake3."""
    model = make_tiny(dtype=dtype, tie_word_embeddings=tied)
    assert weights_fingerprint(model, digest="sha256") == _old_fingerprint(model, "sha256")
    assert weights_fingerprint(model) == _old_fingerprint(model, "blake3")


def test_a_capture_made_before_blake3_validates_with_its_model(tiny, tmp_path):
    """A capture whose fingerprint is v2 (sha256, as every capture before 1.5) is checked under v2."""
    run_capture(tiny, tmp_path / "cap")

    def older(meta):
        meta["model"]["weights_fingerprint_algorithm"] = provenance.FINGERPRINT_ALGORITHMS["sha256"]
        meta["model"]["weights_fingerprint"] = _old_fingerprint(tiny, "sha256")

    rewrite_manifest(tmp_path / "cap", edit_meta=older, keep_digest=True)
    report = zkllm_hf.validate(tmp_path / "cap", model=tiny)
    assert report.ok, str(report)
    assert "weights_fingerprint" in {r.check for r in report.results if r.passed}


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    full = provenance.weights_fingerprint

    def counted(*a, **k):
        calls.append(1)
        return full(*a, **k)

    monkeypatch.setattr(provenance, "weights_fingerprint", counted)
    return calls


def test_the_fingerprint_is_reused_while_the_parameters_are_unchanged(monkeypatch):
    model = make_tiny()
    calls = _counting(monkeypatch)
    first = cached_fingerprint(model)
    assert first == (_old_fingerprint(model, "blake3"), "full") and len(calls) == 1
    assert cached_fingerprint(model) == (first[0], "cached") and len(calls) == 1
    assert cached_fingerprint(model, mode="full") == (first[0], "full") and len(calls) == 2
    assert cached_fingerprint(model, digest="sha256") == (_old_fingerprint(model, "sha256"), "full")


def test_an_in_place_update_invalidates_the_fingerprint():
    """``p.add_(1)`` under no_grad bumps the parameter's version counter: the cache recomputes."""
    model = make_tiny()
    before, _ = cached_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).add_(1)
    after, how = cached_fingerprint(model)
    assert how == "full" and after != before and after == _old_fingerprint(model, "blake3")


def test_load_state_dict_invalidates_the_fingerprint():
    model, other = make_tiny(seed=0), make_tiny(seed=1)
    before, _ = cached_fingerprint(model)
    model.load_state_dict(other.state_dict())
    after, how = cached_fingerprint(model)
    assert how == "full" and after != before and after == _old_fingerprint(other, "blake3")


def test_a_reassigned_parameter_invalidates_the_fingerprint():
    """A new tensor in the parameter's place (another storage) is seen even at version 0."""
    model = make_tiny()
    before, _ = cached_fingerprint(model)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone() * 2)
    after, how = cached_fingerprint(model)
    assert how == "full" and after != before and after == _old_fingerprint(model, "blake3")


def test_the_manifest_records_how_the_fingerprint_was_made(tiny, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    modes = []
    for name, kw in (("a", {}), ("b", {}), ("c", {"fingerprint": "full"})):
        with torch.no_grad(), zkllm_hf.capture(tiny, tmp_path / name, **kw):
            tiny(tiny_ids())
        meta = zkllm_hf.load_capture(tmp_path / name).metadata["model"]
        modes.append(meta["weights_fingerprint_mode"])
        assert meta["weights_fingerprint"] == _old_fingerprint(tiny, "blake3")
    assert modes == ["full", "cached", "full"] and len(calls) == 2
    with pytest.raises(ValueError, match="fingerprint='sometimes'"):
        zkllm_hf.capture(tiny, tmp_path / "d", fingerprint="sometimes")


def test_4bit_capture_validates_with_the_model_that_made_it(tmp_path):
    """Defect: ``tests/test_capture.py::test_quantized_models_bitsandbytes`` failed on a fresh machine: the
    capture recorded the fingerprint of the weights before (or during) the first forward's repacking."""
    model = _bnb_model(tmp_path / "tiny", "4bit")
    run_capture(model, tmp_path / "cap")
    report = zkllm_hf.validate(tmp_path / "cap", model=model)
    assert report.ok, str(report)
    assert "weights_fingerprint" in {r.check for r in report.results if r.passed}
    fresh = _bnb_model(tmp_path / "tiny", "4bit")
    assert zkllm_hf.validate(tmp_path / "cap", model=fresh).ok


def test_a_fingerprint_made_by_another_algorithm_is_named_as_such(tiny, tmp_path):
    """A capture whose fingerprint was made by another algorithm fails with that reason, in one line, instead
    of as an unexplained mismatch."""
    run_capture(tiny, tmp_path / "cap")

    def older(meta):
        meta["model"]["weights_fingerprint_algorithm"] = "sha256 over the state dict (an older zkllm-hf)"
        meta["model"]["weights_fingerprint"] = "0" * 64

    rewrite_manifest(tmp_path / "cap", edit_meta=older, keep_digest=True)
    report = zkllm_hf.validate(tmp_path / "cap", model=tiny)
    [failure] = [f for f in report.failures if f.check == "weights_fingerprint"]
    assert "an older zkllm-hf" in failure.message and FINGERPRINT_ALGORITHM in failure.message
    assert "\n" not in failure.message
    assert {f.check for f in report.failures} == {"weights_fingerprint"}


def test_inference_tensors_are_hashed_every_time():
    """Defect: a model holding an inference tensor (made under torch.inference_mode, as bitsandbytes' CPU
    repacking does in a forward) crashed the cache ("Inference tensors do not track version counter"). Such a
    tensor can change without a trace, so nothing is cached for it."""
    model = make_tiny()
    with torch.inference_mode():
        model.register_buffer("made_in_inference", torch.ones(3))
    assert cached_fingerprint(model)[1] == "full"
    assert cached_fingerprint(model) == (_old_fingerprint(model, "blake3"), "full")
