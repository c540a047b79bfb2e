"""The report's HTML: the page around the figures, its tables and its inline CSS. Every value from a capture
is escaped (a prompt may hold markup); nothing on the page is fetched from anywhere."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .provenance import utc_now
from .version import __version__

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d1d1f; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 32px; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; }
.verdict { display: inline-block; padding: 4px 12px; border-radius: 4px; font-weight: 600; color: #fff; }
.ok { background: #2e7d32; } .bad { background: #c62828; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; margin: 8px 0; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eee; vertical-align: top; }
th { background: #f5f5f7; } td.k { width: 26%; color: #444; white-space: nowrap; }
td { word-break: break-all; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0 0 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85em; }
pre { background: #f5f5f7; padding: 8px; overflow-x: auto; font-size: 0.8em; max-height: 480px; }
li.fail { color: #c62828; }
"""

GENERATOR = "zkllm-hf report"  # in every page's <meta name="generator">: how --overwrite knows a page is ours


def metadata_json(meta: Mapping[str, Any]) -> str:
    """The metadata as the page prints it in full (its capture.json, less the digests)."""
    body = {k: v for k, v in meta.items() if k not in ("manifest_digest", "sidecar")}
    return json.dumps(body, indent=1, sort_keys=True, default=str)


_EXPLAIN = {
    "headroom": "The largest |value| of each point per layer. A value at or beyond the dashed line does not fit "
    "int32 at the capture's scale (the capture would have been refused); the closer a line comes to it, the less "
    "room a longer prompt or a larger scale has.",
    "identities": "Each identity the contract checks (skip_1, skip_2, both RMSNorms; chain is exact), its worst "
    "per-element deviation divided by its per-element bound, as the capture gate recorded it with the model "
    "(the manifest's max_dev_ratio column). Above 1 is a failure; 0 means exact.",
    "drift": "With --residuals exact-int the residual files are derived in int32; each derived point's worst "
    "drift from the model's own codes, divided by the contract's drift bound.",
    "gate": "zkLLM's SwiGLU lookup table spans [-512, 512): a layer whose largest |gate_proj output| reaches 512 "
    "(red) cannot be proved by upstream zkLLM.",
    "units": "Each unit (one proof) of the dataset: its seq_len, coloured by whether it passed validation.",
}
_TITLES = {"headroom": "Headroom: |x| against int32", "identities": "Identities: worst deviation / bound",
           "drift": "Exact-int drift", "gate": "|gate| against zkLLM's table", "units": "Units"}


def esc(value: Any) -> str:
    """A value as escaped text (None as an em dash, containers as compact JSON)."""
    if value is None:
        return "—"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, default=str)
    return html.escape(str(value))


def _ids(ids: Sequence[int] | None) -> str | None:
    if ids is None:
        return None
    return ", ".join(map(str, ids[:24])) + (f", ... ({len(ids)} in all)" if len(ids) > 24 else f" ({len(ids)})")


def audit_fields(meta: Mapping[str, Any], unit: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """The audit metadata, field by field: the capture's (``meta``) and, for one unit, its tokens."""
    model, tok = meta.get("model") or {}, meta.get("tokenizer") or {}
    capture, contract, versions = meta.get("capture") or {}, meta.get("contract") or {}, meta.get("versions") or {}
    source = (meta.get("extra") or {}).get("source") or {}
    rows: list[tuple[str, Any]] = [
        ("model", f"{model.get('class')} ({model.get('model_type')})"),
        ("model.name_or_path", model.get("name_or_path")),
        ("model.weights_fingerprint", model.get("weights_fingerprint")),
        ("model.config_sha256", model.get("config_sha256")),
        ("model.dtype", model.get("dtype")),
        ("model.quantization", model.get("quantization") or "none"),
        ("model.attn_implementation", model.get("attn_implementation")),
        *[(f"source.{k}", v) for k, v in source.items() if k != "converted_files_sha256"],
        ("tokenizer", f"{tok.get('class')} {tok.get('name_or_path')}" if tok else "not recorded"),
        ("tokenizer.fingerprint", tok.get("fingerprint")),
        ("capture.mode", capture.get("mode")),
        ("capture.layers", capture.get("layers")),
        ("capture.scale_log2", capture.get("scale_log2")),
        ("capture.residuals", capture.get("residuals")),
        ("capture.device", capture.get("device")),
        ("capture.created_utc", capture.get("created_utc")),
        ("contract", f"{contract.get('name')} {contract.get('version')} ({contract.get('folder')})"),
        *[(f"versions.{k}", v) for k, v in sorted(versions.items())],
    ]
    if unit is not None:
        tokens = unit.get("tokens") or {}
        rows += [
            ("tokens.seq_len", tokens.get("seq_len")),
            ("tokens.prompt, generated", f"{tokens.get('prompt_token_count')}, {tokens.get('generated_token_count')}"),
            ("tokens.pad_token_id", tokens.get("pad_token_id")),
            ("tokens.input_ids", _ids(tokens.get("input_ids"))),
            ("tokens.prompt_text", tokens.get("prompt_text")),
            ("tokens.generated_text", tokens.get("generated_text")),
        ]
    return rows


def _kv_table(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><td class="k">{esc(k)}</td><td>{esc(v)}</td></tr>' for k, v in rows)
    return f'<table id="metadata-table"><tr><th>field</th><th>value</th></tr>{body}</table>'


def _units_table(units: Sequence[Any]) -> str:
    head = "<tr><th>unit</th><th>prompt id</th><th>phase</th><th>seq_len</th><th>verdict</th><th>prompt text</th></tr>"
    body = []
    for u in units:
        tokens, unit = u.metadata.get("tokens") or {}, u.metadata.get("unit") or {}
        verdict = "valid" if u.ok else f"invalid ({len(u.failures)} failures)"
        text = tokens.get("prompt_text")
        shown = text if text is None or len(text) <= 120 else text[:117] + "..."
        body.append(
            f'<tr><td>{esc(u.folder)}</td><td>{esc(u.prompt_id)}</td><td>{esc(unit.get("phase"))}</td>'
            f'<td class="n">{esc(tokens.get("seq_len"))}</td>'
            f'<td class="{"ok-t" if u.ok else "bad-t"}">{esc(verdict)}</td><td>{esc(shown)}</td></tr>'
        )
    return f'<table id="units-table">{head}{"".join(body)}</table>'


def _section(name: str, alt_img: tuple[str, str]) -> str:
    alt, img = alt_img
    return (
        f'<section id="{name}"><h2>{esc(_TITLES[name])}</h2><p>{esc(_EXPLAIN[name])}</p>'
        f"<figure>{img}<figcaption>{esc(alt)}</figcaption></figure></section>"
    )


def _failures(report: Any) -> str:
    fails = report.failures
    if not fails:
        return "<p>Every check that runs without the model passed.</p>"
    items = "".join(f'<li class="fail">{esc(r.describe())}</li>' for r in fails[:200])
    more = f"<p>... and {len(fails) - 200} more.</p>" if len(fails) > 200 else ""
    return f"<ul>{items}</ul>{more}"


def page(path: Path, meta: Mapping[str, Any], units: Sequence[Any], report: Any, figs: Mapping[str, Any],
         dataset: bool) -> str:
    """The whole page."""
    verdict = "VALID" if report.ok else f"INVALID: {len(report.failures)} failed checks"
    kind = f"dataset of {len(units)} units" if dataset else "one unit"
    sections = [_section(name, figs[name]) for name in ("headroom", "identities", "drift", "gate")]
    if dataset:
        sections.insert(0, _section("units", figs["units"]) + _units_table(units))
    skipped = sorted({f"{r.check}: {r.skipped}" for r in report.skipped})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zkllm-hf report: {esc(path.name)}</title>
<style>{CSS}</style></head>
<body>
<header><h1>zkllm-hf report: {esc(path.name)}</h1>
<p class="sub">{esc(path.resolve())} — {esc(kind)}; page written {esc(utc_now())} by zkllm-hf {esc(__version__)}</p>
<p><span id="verdict" class="verdict {"ok" if report.ok else "bad"}">{esc(verdict)}</span>
 validate without the model ({len(report.results)} results; the checks that need the model are skipped)</p></header>
<section id="checks"><h2>Checks</h2>{_failures(report)}
<p>Skipped: {esc("; ".join(skipped) or "none")}</p></section>
{"".join(sections)}
<section id="metadata"><h2>Audit metadata</h2>{_kv_table(audit_fields(meta, None if dataset else meta))}</section>
<section id="capture-json"><h2>All metadata</h2><details><summary>capture.json (the manifest's metadata)</summary>
<pre>{esc(metadata_json(meta))}</pre></details></section>
</body></html>
"""


__all__ = ["CSS", "GENERATOR", "audit_fields", "esc", "metadata_json", "page"]
