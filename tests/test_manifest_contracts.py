"""The Arrow manifest (readers, metadata, atomicity) and the pandera manifest contract."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
import torch
from conftest import make_tiny, tiny_ids

import zkllm_hf
from zkllm_hf.contracts import contracts_root, load_contract
from zkllm_hf.manifest import COLUMNS, read_manifest
from zkllm_hf.points import POINTS, parse_layers


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "cap"
    model = make_tiny()
    with torch.no_grad(), zkllm_hf.capture(model, out, prompt_length=12, pad_token_id=0):
        model(tiny_ids())
    return out


@pytest.fixture
def frame(captured):
    return pd.read_feather(captured / "manifest.arrow")  # pandas reads the Arrow IPC file as it is


def test_columns_and_rows(captured, frame):
    table = pa.ipc.open_file(pa.memory_map(str(captured / "manifest.arrow"))).read_all()
    required = {"sample", "step", "phase", "layer", "point", "file", "rows", "cols", "dtype", "scale_log2",
                "byte_size", "sha256", "source_dtype", "int_min", "int_max", "hf_module", "hook", "check",
                "max_dev_lsb", "max_dev_ratio"}
    assert required <= set(table.column_names) and tuple(table.column_names) == COLUMNS
    assert len(frame) == 3 * 8
    assert set(frame["file"]) == {p.name for p in captured.glob("*.bin")}
    sums = frame[frame["check"].isin(["skip_1", "skip_2"])]
    assert len(sums) == 6 and (sums["max_dev_ratio"] <= 1).all()
    assert set(frame.loc[frame["point"] == "attn_output", "hf_module"]) == {f"model.layers.{i}.self_attn"
                                                                           for i in range(3)}


def test_polars_and_duckdb_read_it(captured):
    pl = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    assert pl.read_ipc(captured / "manifest.arrow").height == 24
    manifest = pa.ipc.open_file(pa.memory_map(str(captured / "manifest.arrow"))).read_all()  # noqa: F841
    assert duckdb.sql("select count(*) from manifest where point = 'block_output'").fetchall() == [(3,)]


def test_metadata_is_what_an_auditor_needs(captured):
    _, meta = read_manifest(captured / "manifest.arrow")
    assert meta["format_version"] == 1
    assert meta["contract"] == {"name": "zkllm-hf-capture", "version": "1.5.0", "folder": "v1"}
    assert set(meta["versions"]) >= {"zkllm_hf", "transformers", "torch", "python"}
    model = meta["model"]
    assert model["class"] == "LlamaForCausalLM" and len(model["config_sha256"]) == 64
    assert len(model["weights_fingerprint"]) == 64 and model["dtype"] == "float32"
    assert model["attn_implementation"] and model["quantization"] is None
    tokens = meta["tokens"]
    assert tokens == {"input_ids": tiny_ids()[0].tolist(), "position_ids": list(range(16)), "generated_token_count": 0,
                      "prompt_token_count": 12, "seq_len": 16, "pad_token_id": 0}
    assert meta["kind"] == "unit" and meta["unit"] == {"sample": 0, "step": 0, "phase": "forward", "row": 0}
    assert meta["runtime"]["autocast"] == {"enabled": False, "dtype": "bfloat16", "grad_enabled": False}
    assert meta["capture"]["mode"] == "forward" and meta["capture"]["created_utc"].endswith("Z")


def test_fingerprint_changes_with_any_weight(captured):
    from zkllm_hf.provenance import weights_fingerprint

    model = make_tiny()
    _, meta = read_manifest(captured / "manifest.arrow")
    assert weights_fingerprint(model) == meta["model"]["weights_fingerprint"]
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[3, 5] += 1e-3  # in place: the version counter moves
    assert weights_fingerprint(model) != meta["model"]["weights_fingerprint"]


def test_contracts_ship_and_are_versioned():
    root = contracts_root()
    assert (root / "v1" / "capture.yaml").is_file() and (root / "v1" / "manifest.yaml").is_file()
    contract = load_contract("v1")
    assert contract.folder == "v1" and contract.name == "zkllm-hf-capture" and contract.format_version == 1
    assert {c.scope for c in contract.checks} == {"capture", "file", "layer", "dataset"}
    with pytest.raises(ValueError, match="known contracts"):
        load_contract("v999")


def schema_failures(frame):
    return [r for r in load_contract().validate_manifest(frame) if not r.passed]


def test_schema_accepts_a_real_manifest(frame):
    assert schema_failures(frame) == []


@pytest.mark.parametrize(
    "column, value, check",
    [
        ("sha256", "xyz", "str_matches"),
        ("scale_log2", 31, "in_range"),
        ("dtype", "int64", "isin"),
        ("source_dtype", "int8", "isin"),
        ("layer", -1, "greater_than_or_equal_to"),
        ("hook", "backward", "isin"),
        ("point", "mystery_point", "zkllm_point_name"),
        ("file", "layer-0-foo.txt", "str_matches"),
        ("int_min", -(2**31), "greater_than_or_equal_to"),
        ("headroom", 1.5, "in_range"),
    ],
)
def test_schema_rejects_bad_values(frame, column, value, check):
    bad = frame.copy()
    bad[column] = bad[column].astype(object) if isinstance(value, str) else bad[column]
    bad.loc[5, column] = value
    bad[column] = bad[column].astype(frame[column].dtype)
    found = schema_failures(bad)
    assert any(check in r.message for r in found), [r.message for r in found]


@pytest.mark.parametrize(
    "edit, check",
    [
        (lambda f: f.loc[1:2].assign(file=["x-a.bin", "x-b.bin"]), "zkllm_unique_point_per_layer"),
        (lambda f: f.assign(file=f["file"].where(f.index != 0, "layer-9-attn-output.bin")), "zkllm_file_matches_point"),
        (lambda f: f.assign(byte_size=f["byte_size"] + (f.index == 3)), "zkllm_bytes_match_shape"),
        (lambda f: f.assign(int_min=f["int_max"] + 1), "zkllm_min_le_max"),
        (lambda f: f.assign(scale_log2=f["scale_log2"].where(f.index != 2, 12).astype("int32")), "zkllm_one_scale"),
        (lambda f: f.assign(sha256=f["sha256"].where(f["alias_of"].isna(), "f" * 64)), "zkllm_alias_matches_primary"),
    ],
)
def test_schema_dataframe_checks(frame, edit, check):
    bad = edit(frame)
    if check == "zkllm_unique_point_per_layer":
        bad = pd.concat([frame, bad], ignore_index=True)
    found = schema_failures(bad)
    assert any(check in r.message for r in found), [r.message for r in found]


def test_schema_is_strict_about_columns(frame):
    assert any("column_in_schema" in r.message or "extra" in r.message
               for r in schema_failures(frame.assign(surprise=1)))
    assert schema_failures(frame.drop(columns=["sha256"]))


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers(None, 2) == [0, 1]
    assert parse_layers("0-2, 7", 8) == [0, 1, 2, 7] and parse_layers("-1", 30) == [29]
    for bad in ("3-1", "a", "1-", "0-8"):
        with pytest.raises(ValueError, match="layer spec"):
            parse_layers(bad, 8)


def test_point_table_matches_design():
    files = [(p.name, p.file_name(3), p.alias_names(3)) for p in POINTS]
    assert files == [
        ("block_input", "layer-3-input-rmsnorm-activation.bin", ("layer-3-block-input.bin",)),
        ("input_layernorm_output", "layer-3-self-attn-activation.bin", ()),
        ("attn_output", "layer-3-attn-output.bin", ()),
        ("post_attn_residual", "layer-3-post_attention-rmsnorm-activation.bin", ()),
        ("ffn_input", "layer-3-ffn-activation.bin", ()),
        ("mlp_output", "layer-3-mlp-output.bin", ()),
        ("block_output", "layer-3-block-output.bin", ()),
    ]


def test_fingerprint_never_trusts_addresses():
    """A new model at a freed model's addresses, or an edit through .data, always changes the fingerprint."""
    from zkllm_hf.provenance import weights_fingerprint

    seen = set()
    for seed in range(5):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(64, 64)
        seen.add(weights_fingerprint(layer))
        del layer
    assert len(seen) == 5
    model = make_tiny()
    before = weights_fingerprint(model)
    model.model.layers[0].mlp.down_proj.weight.data.mul_(2)  # bypasses the version counter
    assert weights_fingerprint(model) != before


def test_fingerprint_hashes_tied_weights_under_each_name():
    from zkllm_hf.provenance import weights_fingerprint

    model = make_tiny(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = make_tiny(tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(untied.model.embed_tokens.weight)
    # the same bytes under the same names: hashing a shared tensor once must not change the result
    assert weights_fingerprint(model) == weights_fingerprint(untied)


def test_zkllm_limits_match_the_kernels():
    """The FFN table bound (next_pow2(seq_len x intermediate) >= 2**22) and attention's seq_len rule, checked
    against the figures zkLLM's sources give: Llama-2-7B needs seq_len >= 191, SmolLM2 (1536) >= 1366."""
    from zkllm_hf.profile import ffn_min_seq_len, next_power_of_two, zkllm_limit_warnings

    for intermediate in (1536, 11008, 4096, 128):
        n = ffn_min_seq_len(intermediate)
        assert next_power_of_two(n * intermediate) >= 2**22 > next_power_of_two((n - 1) * intermediate)
    assert ffn_min_seq_len(11008) == 191
    assert zkllm_limit_warnings(1024, 4096, 11008, num_attention_heads=32, num_key_value_heads=32) == []
    warnings = zkllm_limit_warnings(1024, 576, 1536, num_attention_heads=9, num_key_value_heads=3)
    assert len(warnings) == 2 and "--pad-to 2048" in warnings[0] and "grouped-query" in warnings[1]
    assert not any("power of two" in w for w in zkllm_limit_warnings(2048, 576, 1536))  # zkLLM pads dims


def test_weights_fingerprint_is_hashed_while_the_forward_runs_and_matches(tmp_path, monkeypatch):
    """The fingerprint starts on its own thread with the first captured forward (so that on a GPU it overlaps
    the capture's hashing and disk work) and is the fingerprint of the model's weights."""
    import threading

    from zkllm_hf import provenance

    model = make_tiny()
    threads = []
    real = provenance.weights_fingerprint

    def spy(m, **kw):
        threads.append(threading.current_thread().name)
        return real(m, **kw)

    monkeypatch.setattr(provenance, "weights_fingerprint", spy)
    with torch.no_grad(), zkllm_hf.capture(model, tmp_path / "c"):
        model(tiny_ids())
    assert len(threads) == 1 and threads[0].startswith("zkllm-fingerprint")
    meta = read_manifest(tmp_path / "c" / "manifest.arrow")[1]
    assert meta["model"]["weights_fingerprint"] == real(model)
