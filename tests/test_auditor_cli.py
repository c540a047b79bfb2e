"""Issue 18, what an auditor meets on the command line: inspect's counts, columns and labels; exit codes; the
CLI's generation options as in generate(); and the smaller defects the issue lists. Each test was written
before its fix and failed on the commit before it.

The captures run the tiny Llama of ``tiny_dir`` (a word-level tokenizer, milliseconds per capture); one test
uses the real default model, for the GGUF it was converted from."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pyarrow.ipc as ipc
import pytest
import torch
from conftest import WORDS, make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.cli import main

PROMPT = "the quick brown fox"
PROMPT_IDS = [WORDS.index(w) + 3 for w in PROMPT.split()]
PAD_ID, EOS_ID = 1, 2  # tiny_dir's tokenizer: [PAD] 1, [EOS] 2


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def capture(capsys, tiny_dir: Path, out: Path, *extra: str) -> None:
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--out", str(out), "--quiet", *extra)
    assert code == 0, err


def raw_metadata(folder: Path) -> dict:
    """A manifest's metadata read with pyarrow alone, not with zkllm_hf's reader."""
    with ipc.open_file(folder / "manifest.arrow") as f:
        return json.loads(f.schema.metadata[b"zkllm_hf"])


def field(out: str, name: str) -> str:
    """The value of ``name`` in inspect's field/value table."""
    for line in out.splitlines():
        if line.startswith(name + " "):
            return line[len(name):].strip()
    raise AssertionError(f"no {name!r} row in:\n{out}")


def counts(value: str) -> dict[str, int]:
    """'N prompt + M generated + K padding' read back as numbers (a part not shown counts 0)."""
    return {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}\b", value)) else 0
            for k in ("prompt", "generated", "padding")}


def greedy(tiny_dir: Path, n: int) -> list[int]:
    """What greedy generate() gives after the prompt, up to and including the first EOS, computed here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        seq = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=n, do_sample=False, pad_token_id=PAD_ID)
    gen = seq[0, len(PROMPT_IDS):].tolist()
    return gen[: gen.index(EOS_ID) + 1] if EOS_ID in gen else gen


# -- 3. inspect tells the truth ----------------------------------------------------------------------


def test_inspect_counts_prompt_generated_and_padding_in_full_mode(tiny_dir, tmp_path, capsys):
    """Defect: a generate capture showed '64 (4 prompt + 60 padding)' with 8 of the 60 generated."""
    capture(capsys, tiny_dir, tmp_path / "full", "--text", PROMPT, "--generate", "8", "--mode", "full",
            "--pad-to", "64")
    gen = greedy(tiny_dir, 8)
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "full"))
    assert code == 0
    value = field(out, "seq_len")
    assert value.startswith("64") and counts(value) == {
        "prompt": 4, "generated": len(gen), "padding": 64 - 4 - len(gen)}, value


@pytest.mark.parametrize("mode", ["prefill", "steps"])
def test_inspect_counts_in_prefill_and_steps(tiny_dir, tmp_path, capsys, mode):
    capture(capsys, tiny_dir, tmp_path / mode, "--text", PROMPT, "--generate", "3", "--mode", mode)
    unit = tmp_path / mode / ("sample-0/step-0" if mode == "steps" else "")
    code, out, _ = cli(capsys, "inspect", str(unit))
    assert code == 0 and counts(field(out, "seq_len")) == {"prompt": 4, "generated": 0, "padding": 0}
    if mode == "steps":
        code, out, _ = cli(capsys, "inspect", str(tmp_path / mode / "sample-0/step-1"))
        assert code == 0 and counts(field(out, "seq_len")) == {"prompt": 0, "generated": 1, "padding": 0}


def test_inspect_counts_forward_padding_and_a_padded_batch(tiny_dir, tmp_path, capsys):
    capture(capsys, tiny_dir, tmp_path / "fw", "--text", PROMPT, "--pad-to", "16")
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "fw"))
    assert code == 0 and counts(field(out, "seq_len")) == {"prompt": 4, "generated": 0, "padding": 12}
    (tmp_path / "b.txt").write_text("the quick brown fox\nzero knowledge\n")
    capture(capsys, tiny_dir, tmp_path / "batch", "--batch-file", str(tmp_path / "b.txt"))
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "batch" / "sample-1"))
    assert code == 0 and counts(field(out, "seq_len")) == {"prompt": 2, "generated": 0, "padding": 0}


def test_inspect_columns_are_aligned_and_labelled(tiny_dir, tmp_path, capsys):
    """Defect: values starting with a digit were right-aligned (a jagged column); 'headroom 68.8%' meant used;
    the chain's 'worst ratio 0.000' was unexplained."""
    capture(capsys, tiny_dir, tmp_path / "a", "--text", PROMPT)
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "a"))
    assert code == 0
    fields, points = out.split("\n\n")[:2]
    lines = fields.splitlines()
    start = len(lines[1].split("  ")[0]) + 2  # the value column starts after the field column and two spaces
    for line in lines[2:]:
        assert line[start - 2:start] == "  " and line[start] != " ", (line, start)
    header = points.splitlines()[0]
    assert "headroom" not in header and "int32 used" in header
    chain = next(line for line in points.splitlines() if line.startswith("block_input "))
    assert "exact" in chain and "0.000" not in chain, chain


def test_inspect_dataset_shows_versions_and_times(tiny_dir, tmp_path, capsys):
    import transformers

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "the quick brown fox"}\n{"text": "zero knowledge proofs"}\n')
    code, _, err = cli(capsys, "capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts),
                       "--out", str(tmp_path / "ds"), "--quiet")
    assert code == 0, err
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "ds"))
    assert code == 0
    assert f"transformers {transformers.__version__}" in out and f"torch {torch.__version__}" in out
    for unit in ("sample-1", "sample-2"):
        created = raw_metadata(tmp_path / "ds" / unit)["capture"]["created_utc"]
        row = next(line for line in out.splitlines() if line.startswith(unit))
        assert created in row, (created, row)


@pytest.mark.slow
def test_inspect_says_the_weights_were_dequantised_from_gguf(real, tmp_path, capsys):
    """Defect: the default model, dequantised from its Q4_1 GGUF, showed as plain 'float32'."""
    out = tmp_path / "g"
    with torch.no_grad(), zkllm_hf.capture(real.model, out, layers="0") as _:
        real.model(real.tokenizer("Hello", return_tensors="pt").input_ids)
    code, shown, _ = cli(capsys, "inspect", str(out))
    weights = field(shown, "weights")
    assert code == 0 and "float32" in weights and "dequantised from GGUF" in weights and "Q4_1" in weights, weights


# -- 5. generation options as in generate() ----------------------------------------------------------


def test_sampling_options_are_used_and_recorded(tiny_dir, tmp_path, capsys):
    """--max-new-tokens, --do-sample, --temperature, --top-p, --top-k and --seed reach generate() and the
    manifest; the same seed gives the same tokens, which greedy decoding would not explain."""
    from transformers import AutoModelForCausalLM

    args = ["--text", PROMPT, "--max-new-tokens", "6", "--mode", "full", "--do-sample", "--temperature", "1.7",
            "--top-p", "0.95", "--top-k", "40", "--seed", "1234"]
    capture(capsys, tiny_dir, tmp_path / "s1", *args)
    meta = raw_metadata(tmp_path / "s1")
    gen = meta["generation"]
    assert gen["do_sample"] is True and gen["temperature"] == 1.7 and gen["top_p"] == 0.95 and gen["top_k"] == 40
    assert gen["max_new_tokens"] == 6 and gen["seed"] == 1234
    cli_meta = meta["extra"]["cli"]
    assert cli_meta["max_new_tokens"] == 6 and cli_meta["seed"] == 1234 and cli_meta["do_sample"] is True
    # generate() itself with the same settings and seed, computed here
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    torch.manual_seed(1234)
    with torch.no_grad():
        seq = model.generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                             max_new_tokens=6, do_sample=True, temperature=1.7, top_p=0.95, top_k=40,
                             pad_token_id=PAD_ID)
    want = seq[0].tolist()
    if EOS_ID in want[4:]:
        want = want[: 4 + want[4:].index(EOS_ID) + 1]
    assert meta["tokens"]["input_ids"] == want
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "s1"))
    shown = field(out, "generation")
    assert code == 0 and "do_sample True" in shown and "temperature 1.7" in shown and "seed 1234" in shown, shown


def test_generate_stays_an_alias_of_max_new_tokens(tiny_dir, tmp_path, capsys):
    capture(capsys, tiny_dir, tmp_path / "g", "--text", PROMPT, "--generate", "2", "--mode", "full")
    assert raw_metadata(tmp_path / "g")["generation"]["max_new_tokens"] == 2
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", PROMPT, "--out", str(tmp_path / "x"),
                       "--do-sample")
    assert code == 2 and "--max-new-tokens" in err and len(err.strip().splitlines()) == 1, err


def test_chat_applies_the_tokenizers_template(tiny_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = tmp_path / "chat-model"
    import shutil

    shutil.copytree(tiny_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}zero {{ m['content'] }} knowledge{% endfor %}"
    tok.save_pretrained(folder)
    capture(capsys, folder, tmp_path / "c", "--text", PROMPT, "--chat")
    ids = raw_metadata(tmp_path / "c")["tokens"]["input_ids"]
    assert ids == [WORDS.index(w) + 3 for w in f"zero {PROMPT} knowledge".split()]
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", PROMPT, "--out", str(tmp_path / "n"),
                       "--chat", "--quiet")
    assert code == 2 and "chat template" in err and len(err.strip().splitlines()) == 1, err


def test_generation_shows_progress_unless_quiet(tiny_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", PROMPT, "--out", str(tmp_path / "p"),
                       "--max-new-tokens", "3")
    assert code == 0 and "new tokens" in err, err
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", PROMPT, "--out", str(tmp_path / "q"),
                       "--max-new-tokens", "3", "--quiet")
    assert code == 0 and "new tokens" not in err, err


def test_first_run_conversion_logs_its_duration(tmp_path, monkeypatch, caplog):
    import logging

    from zkllm_hf import models

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")

    def fake(src, folder, digest):
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_into", fake)
    with caplog.at_level(logging.INFO, logger="zkllm_hf.models"):
        models.convert_gguf(gguf, cache=tmp_path / "cache")
    assert any(re.search(r"converted m\.gguf .* in \d+\.\d s", r.getMessage()) for r in caplog.records), [
        r.getMessage() for r in caplog.records]


# -- 6. exit codes -----------------------------------------------------------------------------------


def test_an_unsupported_model_exits_2(tiny_dir, tmp_path, capsys):
    import transformers

    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
                                                         n_positions=32)).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    code, _, err = cli(capsys, "capture", "--model", str(folder), "--text", PROMPT, "--out", str(tmp_path / "o"),
                       "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "GPT2LMHeadModel" in err, err


def test_compare_input_errors_exit_2(tiny_dir, tmp_path, capsys):
    capture(capsys, tiny_dir, tmp_path / "a", "--text", PROMPT)
    captured = tmp_path / "a" / "layer-0-attn_output.bin"
    code, _, _ = cli(capsys, "compare", str(tmp_path / "missing.bin"), str(captured), "--tolerance-from",
                     str(tmp_path / "a"))
    assert code == 2
    code, _, _ = cli(capsys, "compare", str(captured), str(captured), "--tolerance-from", str(tmp_path / "none"))
    assert code == 2


@pytest.mark.parametrize("what", ["missing", "empty", "not-a-capture"])
def test_validate_and_inspect_answer_a_non_capture_with_the_same_line(tmp_path, capsys, what):
    """Defect: `validate missing-dir` printed a report, `inspect missing-dir` one line."""
    folder = tmp_path / what
    if what != "missing":
        folder.mkdir()
    if what == "not-a-capture":
        (folder / "notes.txt").write_text("hello")
    answers = []
    for command in ("validate", "inspect"):
        code, out, err = cli(capsys, command, str(folder))
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, (command, out, err)
        answers.append(err)
    assert answers[0] == answers[1] and str(folder) in answers[0]


# -- 7. the smaller defects --------------------------------------------------------------------------


def readme_capture_targets() -> list[tuple[str, bool]]:
    """Each `zkllm-hf capture` command of the README's bash blocks, in order: its --out (default
    'activations') and whether it passes --overwrite."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split("#")[0]
            for part in re.split(r"&&|;", command):
                words = shlex.split(part)
                if "capture" in words and any(w.endswith("zkllm-hf") for w in words):
                    out = words[words.index("--out") + 1] if "--out" in words else "activations"
                    found.append((out, "--overwrite" in words))
    return found


def test_readme_capture_commands_run_in_sequence():
    """Defect: README command 1 wrote activations/, and the next command's --out activations failed 'exists'."""
    seen: set[str] = set()
    targets = readme_capture_targets()
    assert len(targets) >= 3, targets
    for out, overwrite in targets:
        assert overwrite or out not in seen, f"--out {out} is written twice in the README's commands"
        seen.add(out)


def test_capture_dataset_prints_zkllm_limit_warnings_and_returns_them(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "the quick brown fox"}\n')
    code, _, err = cli(capsys, "capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts),
                       "--out", str(tmp_path / "ds"), "--quiet")
    assert code == 0
    assert "warning: seq_len 4 is not a power of two >= 1024" in err and "--pad-to 1024" in err, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = zkllm_hf.capture_dataset(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                   AutoTokenizer.from_pretrained(tiny_dir), ["the quick brown fox"],
                                   tmp_path / "api", layers="0")
    assert any("seq_len 4 is not a power of two" in w and "pad_to=1024" in w for w in res.warnings), res.warnings


def test_api_warnings_name_api_parameters(tmp_path):
    """Defect: warnings shown to API users named the CLI's --pad-to."""
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "a", layers="0") as cap:
        model(tiny_ids(8))
    text = " ".join(cap.result.warnings)
    assert "pad_to=1024" in text and "--pad-to" not in text, text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_int_in_half_precision_is_refused_before_any_forward(tmp_path, dtype):
    """Defect: exact-int in bf16 ran for 19 s, then printed 85 failures without the hint to use float32."""
    model = make_tiny(dtype=dtype)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="float32"):
        zkllm_hf.capture(model, tmp_path / "x", residuals="exact-int")
    assert not calls and not (tmp_path / "x").exists()


def test_exact_int_in_bf16_on_the_cli_is_one_line(tiny_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", PROMPT, "--out", str(tmp_path / "x"),
                       "--residuals", "exact-int", "--dtype", "bfloat16", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--dtype float32" in err, err


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_or_whitespace_prompt_is_refused(tiny_dir, tmp_path, capsys, text):
    from zkllm_hf.models import tokenize_batch

    class Spaces:  # a tokenizer that gives every character a token, whitespace too
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, t):
            return {"input_ids": [5] * len(t)}

    with pytest.raises(ValueError, match="empty|whitespace"):
        tokenize_batch(Spaces(), [text])
    code, _, err = cli(capsys, "capture", "--model", str(tiny_dir), "--text", text, "--out", str(tmp_path / "x"),
                       "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_leaving_the_processor_block_without_finalize_raises(tmp_path):
    """Defect: a `with CaptureLogitsProcessor(...)` block left without finalize() discarded the capture silently."""
    from transformers import LogitsProcessorList

    model = make_tiny()
    with pytest.raises(zkllm_hf.CaptureError, match="finalize"):
        with zkllm_hf.CaptureLogitsProcessor(model, tmp_path / "g", layers="0") as proc, torch.no_grad():
            model.generate(tiny_ids(4), logits_processor=LogitsProcessorList([proc]), max_new_tokens=2,
                           do_sample=False, pad_token_id=0)
    assert not (tmp_path / "g").exists()
    with pytest.raises(KeyError):  # an exception inside the block is the one the user sees
        with zkllm_hf.CaptureLogitsProcessor(model, tmp_path / "h", layers="0"):
            raise KeyError("mine")


@pytest.mark.parametrize("name", ["../missing", "./missing", "/nonexistent/model", "~/no/such/model"])
def test_a_path_like_missing_model_is_no_such_folder(tmp_path, capsys, name):
    code, _, err = cli(capsys, "capture", "--model", name, "--text", PROMPT, "--out", str(tmp_path / "x"), "--quiet")
    assert code == 2 and "no such folder" in err and "hf download" not in err, err


def test_plan_layers_out_of_range_is_one_clean_line(tiny_dir, tmp_path, capsys):
    capture(capsys, tiny_dir, tmp_path / "a", "--text", PROMPT)
    code, _, err = cli(capsys, "plan", str(tmp_path / "a"), "--zkllm-root", str(tmp_path), "--layers", "99")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "layer spec" not in err and err.count("99") == 2 and "--layers 99:" in err, err


def test_capture_dataset_takes_the_sampling_options(tiny_dir, tmp_path, capsys):
    """capture-dataset shares capture's options: sampling reaches each unit's generate() (seeded per prompt, so
    two runs agree) and is recorded with the unit; --chat is refused there, in one line, rather than ignored."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "the quick brown fox"}\n{"text": "zero knowledge"}\n')
    sample = ["--max-new-tokens", "5", "--mode", "full", "--do-sample", "--temperature", "2.0", "--seed", "9"]
    for out in ("d1", "d2"):
        code, _, err = cli(capsys, "capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts),
                           "--out", str(tmp_path / out), "--quiet", *sample)
        assert code == 0, err
    for unit in ("sample-1", "sample-2"):
        a, b = (raw_metadata(tmp_path / d / unit) for d in ("d1", "d2"))
        assert a["tokens"]["input_ids"] == b["tokens"]["input_ids"]
        assert a["extra"]["dataset"]["sampling"] == {"do_sample": True, "temperature": 2.0}
        assert a["extra"]["dataset"]["seed"] == 9
    code, _, err = cli(capsys, "capture-dataset", "--model", str(tiny_dir), "--prompts", str(prompts),
                       "--out", str(tmp_path / "c"), "--quiet", "--chat")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--chat" in err
