"""The README's Python examples run as written, in order, on the real default model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_readme_has_an_example_per_integration():
    text = "\n".join(python_blocks())
    for needle in ("zkllm_hf.capture(", "padding=True", "CaptureLogitsProcessor(", "CaptureCallback(",
                   'for mode in ("prefill", "full", "steps")', "capture_dataset("):
        assert needle in text, needle


@pytest.mark.slow
def test_readme_examples_run(model_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    # what the examples printed: one unit per prompt, de-padded to each prompt's own token count
    n0, n1 = (len(namespace["tok"](t).input_ids) for t in ("The quick brown fox", "Hello there"))
    assert n0 != n1 and f"prefill [('sample-0', {n0}), ('sample-1', {n1})]" in out
    assert f"steps [('sample-0/step-0', {n0}), ('sample-0/step-1', 1)" in out
    assert "replay True exact" in out  # the replay audit
    import zkllm_hf

    for folder in ("activations", "acts-batch", "acts-prefill", "acts-full", "acts-steps", "acts-eval", "acts-set",
                   "acts-audit"):
        assert zkllm_hf.validate(tmp_path / folder).ok, folder
    eval_ds = zkllm_hf.load_capture(tmp_path / "acts-eval")
    assert len(eval_ds) == 2 and eval_ds.metadata["trainer"]["on"] == "evaluate"
    assert "[(1, 16, " in out and "(7, 16, " in out  # the prompt set's index, read by DuckDB: 2 layers x 8 files
    # the audit metadata, read without zkllm-hf: DuckDB's rows, one per unit of the prompt set, with their text
    assert re.search(r"\(1, \d+, 'The quick brown fox', '[0-9a-f]{12}', None, '1\.5\.0', '\d{4}-", out)
    assert re.search(r"\(7, \d+, 'Hello there', '[0-9a-f]{12}', None, '1\.5\.0', '\d{4}-", out)
    from zkllm_hf.provenance import tokenizer_fingerprint

    recorded = json.loads((tmp_path / "activations" / "capture.json").read_text())
    assert recorded["tokenizer"]["fingerprint"] == tokenizer_fingerprint(namespace["tok"])  # the GGUF's tokenizer
    assert recorded["tokens"]["prompt_text"] == "Hello"
    full = zkllm_hf.load_capture(tmp_path / "acts-full")
    assert [u.metadata["unit"]["phase"] for u in full] == ["full"] * 2
