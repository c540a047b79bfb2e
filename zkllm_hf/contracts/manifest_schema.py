"""The pandera checks that ``contracts/v1/manifest.yaml`` names (registered through ``pandera.extensions``),
and the file name a manifest row of a point must carry."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from ..points import FILE_TEMPLATES


def expected_file(point: str, layer: int) -> str | None:
    """The file a manifest row of ``point`` (or its alias) at ``layer`` must name; None for unknown points."""
    template = FILE_TEMPLATES.get(point)
    return None if template is None else template.format(L=layer)


@functools.cache
def register_manifest_checks() -> None:
    """Register the ``zkllm_*`` check methods with pandera (once)."""
    import pandera.extensions as extensions

    @extensions.register_check_method(statistics=[], check_type="element_wise")
    def zkllm_point_name(value: Any) -> bool:
        return value in FILE_TEMPLATES

    @extensions.register_check_method(statistics=[])
    def zkllm_unique_point_per_layer(df: pd.DataFrame) -> pd.Series:
        return ~df.duplicated(subset=["sample", "step", "layer", "point"], keep=False)

    @extensions.register_check_method(statistics=[])
    def zkllm_file_matches_point(df: pd.DataFrame) -> pd.Series:
        return pd.Series(
            [
                expected_file(p, int(lay)) == str(f).rsplit("/", 1)[-1]
                for p, lay, f in zip(df["point"], df["layer"], df["file"])
            ],
            index=df.index,
        )

    @extensions.register_check_method(statistics=[])
    def zkllm_file_in_unit_folder(df: pd.DataFrame) -> pd.Series:
        def ok(file: str, sample: int, step: int) -> bool:
            folder = str(file).rpartition("/")[0]
            return folder in ("", f"sample-{sample}", f"sample-{sample}/step-{step}")

        return pd.Series([ok(f, s, k) for f, s, k in zip(df["file"], df["sample"], df["step"])], index=df.index)

    @extensions.register_check_method(statistics=[])
    def zkllm_bytes_match_shape(df: pd.DataFrame) -> pd.Series:
        return df["byte_size"] == df["rows"] * df["cols"] * 4

    @extensions.register_check_method(statistics=[])
    def zkllm_min_le_max(df: pd.DataFrame) -> pd.Series:
        return df["int_min"] <= df["int_max"]

    @extensions.register_check_method(statistics=[])
    def zkllm_one_scale(df: pd.DataFrame) -> pd.Series:
        return df["scale_log2"] == (df["scale_log2"].mode().iloc[0] if len(df) else 0)

    @extensions.register_check_method(statistics=[])
    def zkllm_alias_matches_primary(df: pd.DataFrame) -> pd.Series:
        digests = list(zip(df["sha256"], _blake3(df)))
        by_file = dict(zip(df["file"], digests))
        ok = [pd.isna(a) or by_file.get(a) == d for a, d in zip(df["alias_of"], digests)]
        return pd.Series(ok, index=df.index)

    @extensions.register_check_method(statistics=[])
    def zkllm_one_digest(df: pd.DataFrame) -> pd.Series:
        # each row carries one digest: sha256 (every capture before 1.5, or --digest sha256) or blake3
        return df["sha256"].isna() != _blake3(df).isna()


def _blake3(df: pd.DataFrame) -> pd.Series:
    """The blake3 column, all null for a manifest written before it."""
    return df["blake3"] if "blake3" in df else pd.Series([None] * len(df), index=df.index, dtype=object)
