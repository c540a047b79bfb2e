"""Issue 14: ownership by manifest, the dataset index bound to its units, resume re-checks what it keeps.

A file belongs to zkllm-hf only if a zkllm-hf manifest (right format, metadata, digest) lists it, or it is a
pid-named staging, old or lock entry. Everything else is foreign: capture and capture-dataset refuse it (exit 2,
naming it) and never change one of its bytes, with or without --overwrite.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import digest_column, digest_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_capture_dataset import files, prompts_file, run, single  # noqa: F401 (fixtures)

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.dataset import check_out_dir, read_prompts
from zkllm_hf.manifest import build_table, read_manifest, write_manifest
from zkllm_hf.writer import check_target


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (symlinks are not followed)."""
    return {name: p.read_bytes() for name, p in files(folder).items()}


def reseal(path: Path, meta_edit=None, rows_edit=None) -> None:
    """Edit a manifest and re-seal its digest, as anyone can (the digest is not a signature)."""
    table, meta = read_manifest(path)
    rows = table.to_pylist()
    if rows_edit is not None:
        rows = rows_edit(rows)
    if meta_edit is not None:
        meta_edit(meta)
    write_manifest(build_table(rows, meta), path)


def one_line_naming(err: str, *names: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in err and all(n in err for n in names)


@pytest.fixture
def copy(single, tmp_path) -> Path:  # noqa: F811
    out = tmp_path / "ds"
    shutil.copytree(single, out)
    return out


# -- (1) ownership by manifest, not by name --------------------------------------------------------------


def test_a_users_manifest_arrow_is_not_replaced(copy, tiny_dir, prompts_file, capsys):  # noqa: F811
    """Defect: capture-dataset took a user's own text file named manifest.arrow for its index, replaced it,
    and exited 0."""
    (copy / "manifest.arrow").write_text("my own notes, not an Arrow file\n")
    before = snapshot(copy)
    assert run(tiny_dir, prompts_file, copy) == 2
    assert one_line_naming(capsys.readouterr().err, "manifest.arrow")
    assert run(tiny_dir, prompts_file, copy, "--overwrite") == 2
    assert one_line_naming(capsys.readouterr().err, "manifest.arrow")
    assert snapshot(copy) == before


def test_a_unit_folder_without_its_manifest_is_foreign(copy, tiny_dir, prompts_file, capsys):  # noqa: F811
    """Defect: a layer-0-....bin in a unit folder that has no unit manifest was deleted (the folder captured
    again over it), exit 0. Our units are renamed into place whole, so a folder without one is not ours."""
    (copy / "sample-5" / "manifest.arrow").unlink()  # sample-5 now holds only .bin files nobody lists
    (copy / "manifest.arrow").unlink()
    before = snapshot(copy)
    assert run(tiny_dir, prompts_file, copy) == 2
    assert one_line_naming(capsys.readouterr().err, "sample-5/")
    assert snapshot(copy) == before


@pytest.mark.parametrize("name", ["notes.txt", "sample-1/layer-0-block-output.bin", "sample-4/manifest.arrow"])
def test_files_under_the_work_folder_are_not_deleted(copy, tiny_dir, prompts_file, capsys, name):  # noqa: F811
    """Defect: anything under .zkllm-work was deleted when the index was written, exit 0."""
    path = copy / ".zkllm-work" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a user's bytes")
    before = snapshot(copy)
    for extra in ((), ("--overwrite",)):
        assert run(tiny_dir, prompts_file, copy, *extra) == 2
        assert one_line_naming(capsys.readouterr().err, ".zkllm-work/")
        assert snapshot(copy) == before


def test_a_step_manifest_in_a_forward_unit_is_not_deleted(copy, tiny_dir, prompts_file, capsys):  # noqa: F811
    """Defect: in a forward-mode run, sample-1/step-3/manifest.arrow (named like a capture file) was deleted
    when sample-1, found broken, was captured again."""
    step = copy / "sample-1" / "step-3"
    step.mkdir()
    shutil.copy(copy / "sample-7" / "manifest.arrow", step / "manifest.arrow")  # a genuine zkllm-hf manifest
    broken = copy / "sample-1" / "layer-1-mlp-output.bin"
    data = bytearray(broken.read_bytes())
    data[3] ^= 1
    broken.write_bytes(bytes(data))
    before = snapshot(copy)
    assert run(tiny_dir, prompts_file, copy) == 2
    assert one_line_naming(capsys.readouterr().err, "sample-1/step-3/")
    assert snapshot(copy) == before


def test_overwrite_refuses_a_folder_that_is_not_a_capture(tmp_path, tiny_dir, prompts_file, capsys):  # noqa: F811
    """Defect: capture-dataset --overwrite deleted a folder of files merely named like a capture's (plain
    capture --overwrite refuses the same folder)."""
    out = tmp_path / "mine"
    (out / "sample-1").mkdir(parents=True)
    (out / "manifest.arrow").write_text("not a manifest")
    (out / "sample-1" / "layer-0-block-output.bin").write_bytes(b"\x01\x02\x03\x04")
    (out / ".zkllm-work").mkdir()
    (out / ".zkllm-work" / "scratch.bin").write_bytes(b"x")
    before = snapshot(out)
    assert run(tiny_dir, prompts_file, out, "--overwrite") == 2
    assert one_line_naming(capsys.readouterr().err, "manifest.arrow")
    assert main(["capture", "--model", str(tiny_dir), "--text", "the fox", "--out", str(out), "--overwrite",
                 "--quiet"]) == 2
    assert one_line_naming(capsys.readouterr().err, "manifest.arrow")
    assert snapshot(out) == before


def test_capture_overwrite_refuses_a_manifest_whose_digest_does_not_match(tiny_dir, tmp_path, capsys):
    """Defect: capture --overwrite trusted any Arrow file with zkllm_hf metadata as its own manifest (no
    format or digest check) and deleted the files it listed."""
    out = tmp_path / "cap"
    assert main(["capture", "--model", str(tiny_dir), "--text", "the fox", "--out", str(out), "--quiet"]) == 0
    table, meta = read_manifest(out / "manifest.arrow")
    meta["note"] = "edited by hand"  # not re-sealed: it no longer reads as a manifest zkllm-hf wrote
    raw = json.dumps(meta).encode()
    write_manifest(table.replace_schema_metadata({b"zkllm_hf": raw}), out / "manifest.arrow")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["capture", "--model", str(tiny_dir), "--text", "the fox", "--out", str(out), "--overwrite",
                 "--quiet"]) == 2
    assert one_line_naming(capsys.readouterr().err, "manifest.arrow")
    assert snapshot(out) == before


def test_many_foreign_files_are_named_a_few_then_counted(copy):
    """The refusal names a few foreign paths, then 'and N more'."""
    for i in range(8):
        (copy / f"user-{i}.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"user-0.txt, .*and 3 more"):
        check_out_dir(copy, read_prompts_of(copy), False)
    with pytest.raises(FileExistsError, match=r"user-0.txt, .*and 3 more"):
        check_target(copy, True)


def read_prompts_of(out: Path):
    return read_prompts(read_manifest(out / "manifest.arrow")[1]["dataset"]["prompts"]["file"])[0]


FOREIGN_NAMES = st.sampled_from([
    "manifest.arrow", "sample-1/manifest.arrow", "sample-1/step-0/manifest.arrow",
    "sample-4/layer-9-ffn-activation.bin", "sample-5/notes.txt", ".zkllm-work/sample-1/manifest.arrow",
    "sample-1/layer-5-block-output.bin",
    ".zkllm-work/x", ".manifest.arrow.tmp", ".sample-1.zkllm-lock.txt", "sample-2/manifest.arrow",
    "sample-7/step-2/layer-0-block-output.bin", "layer-0-block-input.bin", ".sample-1.zkllm-staging-12-xyz",
])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(FOREIGN_NAMES, min_size=1, max_size=4, unique=True), data=st.binary(min_size=1, max_size=64))
def test_any_foreign_file_is_refused_and_left_as_it_was(single, tmp_path_factory, names, data):  # noqa: F811
    """Property: whatever foreign file (named like a capture's or not) lies in a finished dataset, both the
    dataset's and the capture's ownership checks refuse it, with and without --overwrite, naming it."""
    out = tmp_path_factory.mktemp("prop") / "ds"
    shutil.copytree(single, out)
    for name in names:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)  # a new file, or a manifest of ours replaced: the folder it ruled is then foreign
    before = snapshot(out)
    prompts = read_prompts_of(single)
    for call in (lambda: check_out_dir(out, prompts, False), lambda: check_out_dir(out, prompts, True),
                 lambda: check_target(out, True)):
        with pytest.raises(FileExistsError) as info:
            call()
        assert "\n" not in str(info.value)
    assert snapshot(out) == before


def test_a_finished_dataset_is_ours_as_a_whole(single, tiny_dir, prompts_file, tmp_path):  # noqa: F811
    """The positive side: every file of a finished dataset is ours, so --overwrite replaces it, and capture
    --overwrite replaces it too."""
    check_out_dir(single, read_prompts_of(single), False)
    check_out_dir(single, read_prompts_of(single), True)
    check_target(single, True)


# -- (2) the dataset index is bound to its units ---------------------------------------------------------


def failing(path: Path) -> set[str]:
    report = zkllm_hf.validate(path)
    return {f.check for f in report.failures}


def swap_prompt_ids(meta):
    a, b = meta["units"][0], meta["units"][1]
    a["prompt_id"], b["prompt_id"] = b["prompt_id"], a["prompt_id"]


def drop_unit(folder: str):
    def meta_edit(meta):
        meta["units"] = [u for u in meta["units"] if u["folder"] != folder]

    def rows_edit(rows):
        return [r for r in rows if not r["file"].startswith(folder + "/")]

    return meta_edit, rows_edit


@pytest.mark.parametrize(
    ("case", "meta_edit", "rows_edit", "check"),
    [
        ("swapped prompt ids", swap_prompt_ids, None, "dataset_units"),
        ("seq_len", lambda m: m["units"][2].update(seq_len=m["units"][2]["seq_len"] + 1), None, "dataset_units"),
        ("phase", lambda m: m["units"][1].update(phase="prefill"), None, "dataset_units"),
        ("prompt count", lambda m: m["dataset"]["prompts"].update(count=5), None, "dataset_prompts"),
        ("dropped unit", *drop_unit("sample-5"), "dataset_prompts"),
    ],
)
def test_a_resealed_index_that_misstates_its_units_is_invalid(copy, case, meta_edit, rows_edit, check):
    """Defect: validate called VALID a dataset whose index, re-sealed, swapped two units' prompt ids, misstated
    a unit's seq_len or phase, stated the wrong prompt count, or dropped a unit with its entry and rows."""
    if case == "dropped unit":
        shutil.rmtree(copy / "sample-5")
    assert zkllm_hf.validate(copy).ok or case == "dropped unit"
    reseal(copy / "manifest.arrow", meta_edit, rows_edit)
    got = failing(copy)
    assert check in got and "manifest_digest" not in got, (case, got)  # re-sealed: only the binding tells


UNIT_FIELDS = ("folder", "sample", "step", "phase", "prompt_id", "seq_len", "manifest_sha256")


def other_value(field: str, value, draw_int: int):
    if field == "folder":
        return f"sample-{100 + draw_int}"
    if field in ("sample", "step", "seq_len"):
        return value + 1 + draw_int
    if field == "phase":
        return ["prefill", "decode", "full"][draw_int % 3]
    if field == "prompt_id":
        return f"id-{draw_int}" if isinstance(value, int) else draw_int
    return ("0" * 63 + str(draw_int % 10))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(unit=st.integers(0, 3), field=st.sampled_from(UNIT_FIELDS), k=st.integers(0, 50))
def test_every_field_of_a_unit_entry_must_equal_the_units_manifest(single, tmp_path_factory, unit, field, k):  # noqa: F811
    """Property: change any one field of any unit entry of the index (and re-seal it): validate fails."""
    out = tmp_path_factory.mktemp("field") / "ds"
    shutil.copytree(single, out)
    entry = lambda m: m["units"][unit]  # noqa: E731
    reseal(out / "manifest.arrow", lambda m: entry(m).update({field: other_value(field, entry(m)[field], k)}))
    assert not zkllm_hf.validate(out).ok


def test_the_gate_runs_the_same_dataset_checks(copy, tiny_dir, prompts_file, monkeypatch):  # noqa: F811
    """The binding checks are contract entries of scope dataset: the index builder (the gate) runs them too,
    and refuses to write an index whose entry misstates a unit (here: every seq_len read one too long)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import zkllm_hf.dataset_index as index_mod
    from zkllm_hf.contracts import ContractViolation, load_contract
    from zkllm_hf.manifest import remove_manifest

    names = {c.name for c in load_contract("v1").scope("dataset")}
    assert {"dataset_index", "dataset_units", "dataset_prompts"} <= names
    remove_manifest(copy / "manifest.arrow")  # the index, and its capture.json: as a run leaves a stale index
    real_read = index_mod.read_manifest

    def misread(path):
        table, meta = real_read(path)
        meta = json.loads(json.dumps(meta))
        meta["tokens"]["seq_len"] += 1
        return table, meta

    monkeypatch.setattr(index_mod, "read_manifest", misread)
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ContractViolation, match="dataset_units"):
        zkllm_hf.capture_dataset(model, tok, prompts_file, copy, layers="0-2")
    assert not (copy / "manifest.arrow").exists()


# -- (3) resume re-checks before it keeps ---------------------------------------------------------------


def forge(unit: Path, name: str) -> None:
    """Change a unit's .bin and re-record its digest and range in the unit manifest, re-sealed."""
    path = unit / name
    codes = np.fromfile(path, dtype="<i4")
    codes[: len(codes) // 2] += 1000
    codes.astype("<i4").tofile(path)

    column = digest_column(read_manifest(unit / "manifest.arrow")[1])

    def rows_edit(rows):
        for r in rows:
            if r["file"] == name or r["alias_of"] == name:
                r.update({column: digest_of(column, path.read_bytes())})
                r.update(int_min=int(codes.min()), int_max=int(codes.max()))
        return rows

    reseal(unit / "manifest.arrow", rows_edit=rows_edit)


def test_resume_recaptures_a_forged_unit_and_says_why(copy, single, tiny_dir, prompts_file, caplog):  # noqa: F811
    """Defect: a unit whose .bin was edited and whose manifest re-recorded its sha256 and range (re-sealed)
    fails skip_1 in validate, yet a re-run kept it as finished and rewrote the index to cover it."""
    forge(copy / "sample-7", "layer-1-attn-output.bin")
    report = zkllm_hf.validate(copy / "sample-7")
    assert {f.check for f in report.failures} == {"skip_1"}  # integrity and range pass: only the identity tells
    with caplog.at_level(logging.WARNING, logger="zkllm_hf.dataset"):
        assert run(tiny_dir, prompts_file, copy) == 0
    why = [r.getMessage() for r in caplog.records if "sample-7" in r.getMessage()]
    assert len(why) == 1 and "skip_1" in why[0] and "\n" not in why[0], why
    for name, path in files(single).items():
        if name.endswith(".bin"):
            assert path.read_bytes() == (copy / name).read_bytes(), name
    assert zkllm_hf.validate(copy).ok
