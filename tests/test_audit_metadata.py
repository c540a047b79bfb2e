"""The audit metadata every tool reads: capture.json beside each manifest, its SHA-256 under the manifest's
digest, checked by validate; the tokenizer's fingerprint; the prompt text (issue 18, deliverable 1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import WORDS, make_tiny

import zkllm_hf
from zkllm_hf.manifest import METADATA_KEY, read_manifest, rows_digest
from zkllm_hf.writer import foreign_files


def raw_metadata(manifest: Path) -> dict:
    """The manifest's metadata read with pyarrow alone, not zkllm-hf's reader."""
    with pa.memory_map(str(manifest)) as source:
        schema = pa.ipc.open_file(source).schema
    return json.loads(schema.metadata[b"zkllm_hf"])


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


@pytest.fixture(scope="module")
def unit(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("audit") / "cap"
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, out, layers="0-1", tokenizer=tok):
        model(ids_of(tok, "the quick brown fox jumps"))
    return out


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tok) -> Path:
    out = tmp_path_factory.mktemp("audit") / "batch"
    model = make_tiny()
    tok.padding_side = "right"
    enc = tok(["the quick brown fox", "zero knowledge"], return_tensors="pt", padding=True)
    with torch.no_grad(), zkllm_hf.capture(model, out, layers="0-1", tokenizer=tok):
        model(**enc)
    return out


@pytest.fixture
def copy(unit, tmp_path) -> Path:
    target = tmp_path / "cap"
    shutil.copytree(unit, target)
    return target


def seal_by_hand(manifest: Path, table: pa.Table, meta: dict) -> None:
    """Re-seal ``meta`` (its digest recomputed, nothing else) into ``manifest``, as a careful forger would, and
    without write_manifest, which would also write a sidecar."""
    meta["manifest_digest"] = rows_digest(table.to_pylist(), meta)
    sealed = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    tmp = manifest.with_name("forged.arrow")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, sealed.schema) as w:
        w.write_table(sealed)
    os.replace(tmp, manifest)  # the old file stays mapped under ``table`` until it is dropped


def sidecar_failures(folder: Path) -> list:
    report = zkllm_hf.validate(folder)
    return [r for r in report.failures if r.check == "sidecar"]


# -- the sidecar ----------------------------------------------------------------------------------


def test_capture_json_is_the_manifests_metadata_and_its_digest_covers_it(unit):
    meta = raw_metadata(unit / "manifest.arrow")
    data = (unit / "capture.json").read_bytes()
    assert meta["sidecar"] == {"file": "capture.json", "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads(data) == {k: v for k, v in meta.items() if k not in ("manifest_digest", "sidecar")}
    assert not foreign_files(unit)  # listed by its manifest: ours, so --overwrite may replace it


def test_every_manifest_of_a_dataset_has_its_sidecar(batch):
    manifests = sorted(p.parent.relative_to(batch).as_posix() for p in batch.rglob("manifest.arrow"))
    sidecars = sorted(p.parent.relative_to(batch).as_posix() for p in batch.rglob("capture.json"))
    assert manifests == sidecars == [".", "sample-0", "sample-1"]
    index = json.loads((batch / "capture.json").read_text())
    assert index["kind"] == "dataset" and [u["folder"] for u in index["units"]] == ["sample-0", "sample-1"]
    assert zkllm_hf.validate(batch).ok and not foreign_files(batch)


@pytest.mark.parametrize("edit", ["byte", "field", "delete"])
def test_validate_detects_an_edited_or_missing_sidecar(copy, edit):
    assert zkllm_hf.validate(copy).ok
    path = copy / "capture.json"
    if edit == "byte":
        path.write_bytes(path.read_bytes().replace(b'"forward"', b'"fOrward"', 1))
    elif edit == "field":
        data = json.loads(path.read_text())
        data["model"]["weights_fingerprint"] = "0" * 64
        path.write_text(json.dumps(data, sort_keys=True, indent=1) + "\n")
    else:
        path.unlink()
    failed = sidecar_failures(copy)
    assert len(failed) == 1 and "capture.json" in failed[0].message


def test_a_sidecar_resealed_with_its_manifest_must_still_say_what_the_manifest_says(copy):
    """A forger who edits capture.json and records its new SHA-256 in a re-sealed manifest, but leaves the
    manifest's own metadata as it was, is caught: the sidecar must repeat the metadata."""
    table, meta = read_manifest(copy / "manifest.arrow")
    path = copy / "capture.json"
    data = json.loads(path.read_text())
    data["model"]["name_or_path"] = "meta-llama/Llama-2-7b-hf"
    forged = (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()
    meta["sidecar"]["sha256"] = hashlib.sha256(forged).hexdigest()
    seal_by_hand(copy / "manifest.arrow", table, meta)
    path.write_bytes(forged)
    failed = sidecar_failures(copy)
    assert len(failed) == 1 and "does not hold the manifest's metadata" in failed[0].message
    assert not [r for r in zkllm_hf.validate(copy).failures if r.check == "manifest_digest"]


def test_a_capture_from_before_the_sidecar_is_skipped_with_the_reason(copy):
    """A 1.4.0 capture has no capture.json: the check cannot run, and says why; it does not pass."""
    table, meta = read_manifest(copy / "manifest.arrow")
    meta["contract"]["version"] = "1.4.0"
    meta.pop("sidecar")
    (copy / "capture.json").unlink()
    seal_by_hand(copy / "manifest.arrow", table, meta)  # as 1.4.0 wrote it: no sidecar record, digest re-sealed
    assert not (copy / "capture.json").exists()
    report = zkllm_hf.validate(copy)
    (result,) = [r for r in report.results if r.check == "sidecar"]
    assert report.ok and result.skipped and "1.4.0" in result.skipped


def test_a_capture_json_no_manifest_records_is_foreign(copy):
    """Ownership is by manifest: a capture.json beside a manifest that records none is not ours."""
    table, meta = read_manifest(copy / "manifest.arrow")
    meta.pop("sidecar")
    seal_by_hand(copy / "manifest.arrow", table, meta)
    assert foreign_files(copy) == ["capture.json"]


# -- every tool reads it --------------------------------------------------------------------------


def test_pandas_polars_and_duckdb_read_the_audit_fields(unit):
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    meta = raw_metadata(unit / "manifest.arrow")
    path = str(unit / "capture.json")
    frame = pd.json_normalize(json.loads(Path(path).read_text()))
    assert frame.loc[0, "model.weights_fingerprint"] == meta["model"]["weights_fingerprint"]
    assert frame.loc[0, "tokenizer.fingerprint"] == meta["tokenizer"]["fingerprint"]
    df = pl.read_json(path)
    assert df.select(pl.col("tokens").struct.field("input_ids")).item().to_list() == meta["tokens"]["input_ids"]
    row = duckdb.sql(
        f"SELECT model.dtype, versions.torch, contract.version, capture.created_utc::VARCHAR, tokens.prompt_text "
        f"FROM read_json_auto('{path}')"
    ).fetchall()[0]
    assert row[:3] == (meta["model"]["dtype"], meta["versions"]["torch"], meta["contract"]["version"])
    assert row[3].startswith(meta["capture"]["created_utc"][:10]) and row[4] == "the quick brown fox jumps"


def test_duckdb_reads_every_unit_of_a_dataset(batch, tok):
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(
        f"SELECT unit.sample, tokens.seq_len, tokens.prompt_text FROM read_json_auto('{batch}/sample-*/capture.json') "
        f"ORDER BY 1"
    ).fetchall()
    assert rows == [(0, 4, "the quick brown fox"), (1, 2, "zero knowledge")]


# -- the tokenizer's fingerprint and the prompt text -----------------------------------------------


def test_the_tokenizer_fingerprint_is_stable_and_sensitive(tiny_dir, tmp_path, tok, unit):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from zkllm_hf.provenance import tokenizer_fingerprint

    recorded = raw_metadata(unit / "manifest.arrow")["tokenizer"]["fingerprint"]
    fresh = AutoTokenizer.from_pretrained(tiny_dir)
    assert tokenizer_fingerprint(fresh) == recorded
    fresh(["the quick", "a"], padding=True, truncation=True, max_length=8)  # per-call state is not identity
    assert tokenizer_fingerprint(fresh) == recorded
    moved = tmp_path / "elsewhere"
    fresh.save_pretrained(moved)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(moved)) == recorded  # not the folder's path
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(reversed(WORDS))}
    other = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    swapped = PreTrainedTokenizerFast(tokenizer_object=other, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    assert tokenizer_fingerprint(swapped) != recorded  # same words, other ids
    templated = AutoTokenizer.from_pretrained(tiny_dir)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(templated) != recorded


def _fingerprint_by_its_definition(tokenizer) -> str:
    """TOKENIZER_FINGERPRINT_ALGORITHM v1, written out here: the canonical JSON of the whole state, one dump."""
    import hashlib
    import json

    serial = json.loads(tokenizer.backend_tokenizer.to_str())
    serial.pop("padding", None)
    serial.pop("truncation", None)
    state = {
        "tokenizer": serial,
        "special_tokens": json.loads(json.dumps(tokenizer.special_tokens_map, default=str)),
        "added_tokens": {str(k): str(v) for k, v in sorted(tokenizer.added_tokens_decoder.items())},
        "chat_template": tokenizer.chat_template,
    }
    canon = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def test_the_tokenizer_fingerprint_is_its_definition_computed_once(tiny_dir, tok):
    """The fingerprint is the v1 definition's SHA-256 (recomputed here in one dump), for a template-less and a
    templated tokenizer, the second time (the canonical tokenizer.json cached) as the first."""
    from transformers import AutoTokenizer

    from zkllm_hf.provenance import tokenizer_fingerprint

    plain = AutoTokenizer.from_pretrained(tiny_dir)
    templated = AutoTokenizer.from_pretrained(tiny_dir)
    templated.chat_template = "{{ messages[0]['content'] }} \u00e9"
    for t in (plain, templated, plain, templated):
        assert tokenizer_fingerprint(t) == _fingerprint_by_its_definition(t)
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(templated)


def test_the_prompt_text_is_stored_unless_opted_out(unit, tmp_path, tok):
    tokens = raw_metadata(unit / "manifest.arrow")["tokens"]
    assert tokens["prompt_text"] == "the quick brown fox jumps" and tokens["generated_text"] is None
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "quiet", layers="0", tokenizer=tok, store_text=False):
        model(ids_of(tok, "zero knowledge proofs"))
    tokens = raw_metadata(tmp_path / "quiet" / "manifest.arrow")["tokens"]
    assert tokens["prompt_text"] is None and tokens["text_omitted"] == "store_text=False"
    assert tokens["input_ids"] == tok("zero knowledge proofs")["input_ids"]  # the ids are what a proof is about


def test_the_cli_records_the_tokenizer_of_a_local_model_and_the_text(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    from zkllm_hf.cli import main
    from zkllm_hf.provenance import tokenizer_fingerprint

    out = tmp_path / "cli"
    assert main(["capture", "--model", str(tiny_dir), "--text", "a lazy dog", "--layers", "0", "--out", str(out),
                 "--quiet"]) == 0
    meta = json.loads((out / "capture.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_dir))
    assert meta["tokens"]["prompt_text"] == "a lazy dog"
    assert main(["capture", "--model", str(tiny_dir), "--text", "a lazy dog", "--layers", "0", "--out", str(out),
                 "--quiet", "--overwrite", "--no-text"]) == 0
    assert json.loads((out / "capture.json").read_text())["tokens"]["prompt_text"] is None


def test_generated_text_is_stored_with_generation(tiny_dir, tmp_path, tok):
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = ids_of(tok, "the quick brown")
    with zkllm_hf.CaptureLogitsProcessor(model, tmp_path / "full", mode="full", layers="0", tokenizer=tok) as proc:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=LogitsProcessorList([proc]),
                             max_new_tokens=3, do_sample=False, pad_token_id=1)
        proc.finalize(out)
    tokens = raw_metadata(tmp_path / "full" / "manifest.arrow")["tokens"]
    generated = out[0, ids.shape[1]:].tolist()
    generated = generated[: tokens["generated_token_count"]]
    assert tokens["prompt_text"] == "the quick brown"
    assert tokens["generated_text"] == tok.decode(generated)


def test_the_trainer_callback_records_the_trainers_tokenizer(tiny_dir, tmp_path, tok):
    from transformers import AutoModelForCausalLM, DataCollatorWithPadding, Trainer, TrainingArguments

    from zkllm_hf.provenance import tokenizer_fingerprint

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok.padding_side = "right"
    cb = zkllm_hf.CaptureCallback(tmp_path / "eval", max_samples=2, layers="0")
    args = TrainingArguments(str(tmp_path / "t"), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no")
    texts = ["the quick brown fox", "a lazy dog"]
    Trainer(model=model, args=args, eval_dataset=[tok(t) for t in texts], processing_class=tok,
            data_collator=DataCollatorWithPadding(tok), callbacks=[cb]).evaluate()
    index = json.loads((tmp_path / "eval" / "capture.json").read_text())
    assert index["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    got = [json.loads((tmp_path / "eval" / f"sample-{i}" / "capture.json").read_text())["tokens"]["prompt_text"]
           for i in (0, 1)]
    assert got == texts


def test_capture_dataset_writes_and_resume_rechecks_every_sidecar(tiny_dir, tmp_path, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    prompts = [{"id": 3, "text": "the quick fox"}, {"id": 5, "text": "zero knowledge proofs"}]
    out = tmp_path / "set"
    zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("capture.json")) == [
        "capture.json", "sample-3/capture.json", "sample-5/capture.json"]
    assert [json.loads((out / f"sample-{i}" / "capture.json").read_text())["tokens"]["prompt_text"]
            for i in (3, 5)] == ["the quick fox", "zero knowledge proofs"]
    assert zkllm_hf.validate(out).ok and not foreign_files(out)
    edited = out / "sample-5" / "capture.json"
    edited.write_text(edited.read_text().replace("zero knowledge proofs", "zero knowledge"))
    assert [r.unit for r in zkllm_hf.validate(out).failures] == ["sample-5"]
    again = zkllm_hf.capture_dataset(model, tok, prompts, out, layers="0")  # resume: the edited unit is redone
    assert again.captured == [5] and again.reused == [3] and zkllm_hf.validate(out).ok
