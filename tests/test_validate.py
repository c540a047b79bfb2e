"""validate() and the CLI's validate: each kind of damage is caught and names the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import digest_column, make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.cli import main
from zkllm_hf.manifest import METADATA_KEY, build_table, read_manifest, write_manifest


@pytest.fixture(scope="module")
def model():
    return make_tiny()


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("captures")
    for name, seed in (("a", 1), ("b", 2)):
        with torch.no_grad(), zkllm_hf.capture(model, base / name):
            model(tiny_ids(seed=seed))
    return base


@pytest.fixture
def cap(pristine, tmp_path):
    out = tmp_path / "cap"
    shutil.copytree(pristine / "a", out)
    return out


def failures(report, check=None):
    return [f for f in report.failures if check is None or f.check == check]


def rewrite_manifest(path, edit_rows=None, edit_meta=None, keep_digest=False):
    """Rewrite manifest.arrow with edited rows/metadata; optionally recompute its digest (a careful forger)."""
    table, meta = read_manifest(path / "manifest.arrow")
    rows = table.to_pylist()
    if edit_rows:
        edit_rows(rows)
    if edit_meta:
        edit_meta(meta)
    if keep_digest:
        new = build_table(rows, {k: v for k, v in meta.items() if k != "manifest_digest"})
    else:
        new = pa.Table.from_pylist(rows, schema=table.schema).replace_schema_metadata(
            {METADATA_KEY: json.dumps(meta).encode()})
    write_manifest(new, path / "manifest.arrow")


def test_pristine_capture_is_valid(cap, model):
    report = zkllm_hf.validate(cap, model=model)
    assert report.ok, str(report)
    checks = {r.check for r in report.results}
    assert checks >= {"manifest_digest", "manifest_schema", "shape", "completeness", "integrity", "range", "skip_1",
                      "skip_2", "chain", "norm_input", "norm_post_attention", "weights_fingerprint"}


@pytest.mark.parametrize("name", ["layer-0-attn-output.bin", "layer-2-block-output.bin", "layer-1-block-input.bin"])
def test_flipped_byte(cap, name):
    data = bytearray((cap / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (cap / name).unlink()  # break a hard link, so only this name changes
    (cap / name).write_bytes(bytes(data))
    bad = failures(zkllm_hf.validate(cap), "integrity")
    algorithm = digest_column(read_manifest(cap / "manifest.arrow")[1])
    assert [f.file for f in bad] == [name] and algorithm in bad[0].message


def test_truncated_file(cap):
    name = "layer-1-mlp-output.bin"
    with open(cap / name, "r+b") as fh:
        fh.truncate(100)
    report = zkllm_hf.validate(cap)
    assert [(f.file, f.message) for f in failures(report, "integrity")] == [(name, "100 bytes, manifest says 4096")]


def test_missing_file(cap):
    (cap / "layer-2-ffn-activation.bin").unlink()
    report = zkllm_hf.validate(cap)
    assert [(f.file, f.message) for f in failures(report)] == [("layer-2-ffn-activation.bin", "file is missing")]


def test_swapped_files(cap):
    a, b = cap / "layer-0-attn-output.bin", cap / "layer-0-mlp-output.bin"
    tmp = cap / "tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    report = zkllm_hf.validate(cap)
    assert sorted(f.file for f in failures(report, "integrity")) == sorted([a.name, b.name])
    assert {f.check for f in failures(report)} >= {"integrity", "skip_1", "skip_2"}


def test_stray_file(cap):
    shutil.copy(cap / "layer-0-attn-output.bin", cap / "layer-7-attn-output.bin")
    assert [f.file for f in failures(zkllm_hf.validate(cap), "completeness")] == ["layer-7-attn-output.bin"]


def test_edited_manifest_row(cap):
    def edit(rows):
        row = next(r for r in rows if r["file"] == "layer-1-block-output.bin")
        row["int_max"] += 1

    rewrite_manifest(cap, edit)
    report = zkllm_hf.validate(cap)
    assert {f.check for f in failures(report)} == {"manifest_digest", "range"}
    assert [f.file for f in failures(report, "range")] == ["layer-1-block-output.bin"]


@pytest.mark.parametrize("field, delta", [("int_min", -1), ("int_min", 1), ("int_max", 1), ("int_max", -1)])
def test_range_bounds_are_checked_both_ends(cap, field, delta):
    """A careful forger who recomputes the digest still cannot move either recorded bound."""

    def edit(rows):
        row = next(r for r in rows if r["file"] == "layer-2-ffn-activation.bin")
        row[field] += delta

    rewrite_manifest(cap, edit, keep_digest=True)
    bad = failures(zkllm_hf.validate(cap))
    assert [(f.check, f.file) for f in bad] == [("range", "layer-2-ffn-activation.bin")]


def test_edited_row_with_recomputed_digest_is_still_caught(cap):
    def edit(rows):
        row = next(r for r in rows if r["file"] == "layer-0-self-attn-activation.bin")
        row[digest_column(read_manifest(cap / "manifest.arrow")[1])] = "0" * 64

    rewrite_manifest(cap, edit, keep_digest=True)
    bad = failures(zkllm_hf.validate(cap))
    assert [(f.check, f.file) for f in bad] == [("integrity", "layer-0-self-attn-activation.bin")]


def test_manifest_of_another_capture(cap, pristine):
    shutil.copy(pristine / "b" / "manifest.arrow", cap / "manifest.arrow")
    report = zkllm_hf.validate(cap)
    bad = failures(report, "integrity")
    assert len(bad) == 24 and all(f.file for f in bad)


def test_wrong_scale_in_one_row(cap):
    def edit(rows):
        rows[3]["scale_log2"] = 17

    rewrite_manifest(cap, edit, keep_digest=True)
    report = zkllm_hf.validate(cap)
    shape = failures(report, "shape")
    assert len(shape) == 1 and "scale_log2 17, metadata says 16" in shape[0].message
    assert failures(report, "manifest_schema")  # zkllm_one_scale


def test_wrong_scale_everywhere_is_caught_by_the_model(cap, model):
    """A consistent forgery of the scale passes the disk-only checks; recomputing the norms catches it."""
    def rows(rs):
        for r in rs:
            r["scale_log2"] = 17

    def meta(m):
        m["capture"]["scale_log2"] = 17

    rewrite_manifest(cap, rows, meta, keep_digest=True)
    with_model = zkllm_hf.validate(cap, model=model)
    assert {f.check for f in with_model.failures} == {"norm_input", "norm_post_attention"}
    assert {f.layer for f in with_model.failures} == {0, 1, 2}


def test_other_model_weights(cap):
    other = make_tiny()
    with torch.no_grad():  # a weight no check recomputes: only the fingerprint differs
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert {f.check for f in zkllm_hf.validate(cap, model=other).failures} == {"weights_fingerprint"}
    with torch.no_grad():
        other.model.layers[2].input_layernorm.weight.mul_(1.05)
    report = zkllm_hf.validate(cap, model=other)
    assert {(f.check, f.layer) for f in report.failures} == {("weights_fingerprint", None), ("norm_input", 2)}


def test_unfinished_capture(tmp_path, cap):
    (cap / "manifest.arrow").unlink()
    (cap / "PARTIAL").write_text("")
    report = zkllm_hf.validate(cap)
    assert not report.ok and "interrupted" in report.failures[0].message
    with pytest.raises(zkllm_hf.CaptureNotFinished, match="not a finished capture"):
        zkllm_hf.load_capture(cap)


def test_load_capture_arrays(cap, model):
    c = zkllm_hf.load_capture(cap)
    codes = c.ints[1, "attn_output"]
    assert isinstance(codes, np.memmap) and codes.dtype == np.int32 and codes.shape == (16, 64)
    raw = np.fromfile(cap / "layer-1-attn-output.bin", dtype=np.int32).reshape(16, 64)
    assert np.array_equal(codes, raw)
    assert np.array_equal(c.floats[1, "attn_output"], raw / 65536.0)
    assert len(c.ints) == 24 and (2, "block_input_alias") in set(c.ints)


def test_cli_validate_exit_codes_and_json(cap, capsys):
    assert main(["validate", str(cap)]) == 0
    assert "VALID" in capsys.readouterr().out
    (cap / "layer-0-mlp-output.bin").unlink()
    assert main(["validate", str(cap), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [f["file"] for f in report["failures"]] == ["layer-0-mlp-output.bin"]


def test_cli_inspect(cap, capsys):
    assert main(["inspect", str(cap)]) == 0
    out = capsys.readouterr().out
    for text in ("LlamaForCausalLM", "seq_len", "16 = 16 prompt + 0 generated + 0 padding", "0-2 (3)", "all match",
                 "VALID", "block_output", "skip_2", "int32 used"):
        assert text in out, text
    (cap / "layer-0-mlp-output.bin").write_bytes(b"\0" * 4096)
    assert main(["inspect", str(cap)]) == 1
    assert "1 mismatch" in capsys.readouterr().out


def test_cli_plan_lists_captured_inputs(cap, tmp_path, capsys):
    import shlex

    spaced = tmp_path / "a folder with spaces"
    shutil.move(cap, spaced)
    zk = str(tmp_path / "zkllm")  # plan refuses a folder without zkLLM's scripts, and this capture's shape:
    assert main(["plan", str(spaced), "--zkllm-root", zk]) == 1  # --force writes the script anyway
    assert "seq_len 16 is not a power of two" in capsys.readouterr().err
    assert main(["plan", str(spaced), "--zkllm-root", zk, "--force"]) == 0
    out, err = capsys.readouterr()
    q = lambda name: shlex.quote(str(spaced.resolve() / name))  # noqa: E731
    # zkLLM pastes its paths into shell commands unquoted: it gets them through a plain-named link, and the
    # script checks each one by its own quoted path first
    assert '--input_file "$LINKS/capture/layer-2-ffn-activation.bin"' in out
    assert f"need {q('layer-2-ffn-activation.bin')}" in out
    assert ('--block_input_file "$LINKS/capture/layer-1-post_attention-rmsnorm-activation.bin" '
            '--block_output_file "$LINKS/capture/layer-1-mlp-output.bin"') in out
    assert f"need {q('layer-1-post_attention-rmsnorm-activation.bin')} {q('layer-1-mlp-output.bin')}" in out
    assert "seq_len 16 is not a power of two" in err
    words = [w for ln in out.splitlines() if not ln.lstrip().startswith("#") for w in shlex.split(ln)]
    named = [w for w in words if w.startswith(str(spaced.resolve()))]  # the shell sees one word per path
    assert len(named) >= 7 * 3 and all(Path(w).is_file() for w in named)


def test_cli_plan_refuses_an_invalid_or_crafted_capture(cap, capsys):
    """A row whose file name carries shell syntax fails the contract: plan prints no command at all."""

    def edit(rows):
        next(r for r in rows if r["file"] == "layer-0-mlp-output.bin")["file"] = "x.bin; echo INJECTED"

    rewrite_manifest(cap, edit, keep_digest=True)
    assert main(["plan", str(cap), "--zkllm-root", str(cap.parent), "--force"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "plan only feeds zkLLM a valid capture" in err and "INJECTED" not in out


def test_cli_on_a_folder_that_is_not_a_capture(tmp_path, capsys):
    for command in (["inspect"], ["plan", "--zkllm-root", str(tmp_path)]):
        assert main([*command, str(tmp_path)]) == 1
        assert "not a finished capture" in capsys.readouterr().err


def test_unknown_source_dtype_is_reported_not_raised(cap):
    def edit(rows):
        for r in rows:
            if r["layer"] == 1:
                r["source_dtype"] = "int8"

    rewrite_manifest(cap, edit, keep_digest=True)
    report = zkllm_hf.validate(cap)
    assert {f.check for f in report.failures} == {"manifest_schema"}
    assert not any(r.check.startswith("skip") and r.layer == 1 for r in report.results)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_manifest_paths_cannot_leave_the_capture(cap, tmp_path, kind, monkeypatch, capsys):
    """A row naming a file outside the capture is refused by name and never opened, even when the outside
    file holds exactly the bytes the row's checksum expects and the forger recomputed the digest."""
    from pathlib import Path

    victim = tmp_path / "victim.bin"
    victim.write_bytes((cap / "layer-0-mlp-output.bin").read_bytes())
    name = {"dotdot": "../victim.bin", "absolute": str(victim), "symlink": "layer-0-mlp-output.bin"}[kind]
    if kind == "symlink":
        (cap / name).unlink()
        (cap / name).symlink_to(victim)

    def edit(rows):
        next(r for r in rows if r["file"] == "layer-0-mlp-output.bin")["file"] = name

    rewrite_manifest(cap, edit, keep_digest=True)
    opened = []
    read_bytes, memmap = Path.read_bytes, np.memmap.__new__
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.resolve()) or read_bytes(self))
    monkeypatch.setattr(np.memmap, "__new__", lambda cls, f, *a, **k: opened.append(Path(f).resolve())
                        or memmap(cls, f, *a, **k))
    report = zkllm_hf.validate(cap)
    contained = failures(report, "containment")
    assert [(f.file, f.layer, f.point) for f in contained] == [(name, 0, "mlp_output")]
    assert "outside the capture folder" in contained[0].message and "not opened" in contained[0].message
    assert victim.resolve() not in opened and opened  # the other files were read
    with pytest.raises(zkllm_hf.UnsafeManifestError, match=r"layer 0 mlp_output names file .*refusing to open"):
        zkllm_hf.load_capture(cap)
    for command in (["inspect"], ["plan", "--zkllm-root", str(tmp_path)]):
        assert main([*command, str(cap)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to open it" in err[0]
    assert victim.resolve() not in opened
