"""The proof budget: what zkLLM will cost for a capture's shape, said before any GPU time is spent.

Prover time, peak GPU memory and proof size, per layer and in all, the one-time commit, and which GPUs the
memory fits on: scaled from the zkLLM paper's two published points (LLaMa-2-7B and 13B on an A100 40 GB at
seq_len 2048) by a model whose terms are counted from zkLLM's algorithm and sources. The figures, their
sources, the counts and the assumptions that make two points enough are in one data file,
``zkllm_costs.yaml`` beside this module; the coefficients are fitted from it when it is first read, so the
model reproduces the published figures at their points by construction. docs/architecture.md §5, "The proof
budget", explains it. It is an estimate, and every output says so.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from ..profile import ATTENTION_MIN_SEQ_LEN, FFN_TABLE_LOG2, next_power_of_two

COSTS_FILE = "zkllm_costs.yaml"
GB, KB = 1e9, 1e3


@dataclass(frozen=True)
class Shape:
    """What the costs depend on: the padded seq_len zkLLM proves, the widths of the (MHA) model it proves,
    the layers proved and the model's layer count (the commit covers every layer)."""

    seq_len: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    layers: int = 1
    model_layers: int | None = None


def term_sizes(s: Shape) -> dict[str, tuple[int, int]]:
    """Each term of the data file: (elements of one instance, instances per layer)."""
    S, H, I = s.seq_len, s.hidden_size, s.intermediate_size  # noqa: E741
    return {
        "seq_hidden": (S * H, 1),
        "seq_intermediate": (S * I, 1),
        "hidden_hidden": (H * H, 1),
        "hidden_intermediate": (H * I, 1),
        "seq_seq_heads": (S * S, s.num_attention_heads),
        "seq_seq": (S * S, 1),
        "hidden": (H, 1),
        "swiglu_table": (2**FFN_TABLE_LOG2, 1),
    }


def ceil_log2(n: int) -> int:
    return max(0, (n - 1).bit_length())


def work_elements(s: Shape, counts: dict[str, int]) -> int:
    """Elements one layer's proof passes over, each tensor padded to a power of two as zkLLM pads it."""
    sizes = term_sizes(s)
    return sum(c * sizes[t][1] * next_power_of_two(sizes[t][0]) for t, c in counts.items())


def proof_rounds(s: Shape, counts: dict[str, int], stacked: int) -> int:
    """Sumcheck rounds of the proof of ``stacked`` layers proved together (each pass over all of them)."""
    sizes = term_sizes(s)
    return sum(c * ceil_log2(stacked * sizes[t][1] * sizes[t][0]) for t, c in counts.items())


def step_elements(s: Shape, counts: dict[str, int]) -> int:
    """Elements a step holds at once (unpadded: zkLLM's binaries load and compute at the real sizes)."""
    sizes = term_sizes(s)
    return sum(c * sizes[t][0] * sizes[t][1] for t, c in counts.items())


def commit_elements(s: Shape) -> int:
    """Padded weight elements llama-commit.py commits: every dimension to a power of two (fr-tensor.cu:809)."""
    h, i = next_power_of_two(s.hidden_size), next_power_of_two(s.intermediate_size)
    return (s.model_layers or s.layers) * (4 * h * h + 3 * h * i + 2 * h)


def commit_peak_bytes(s: Shape, costs: dict) -> float:
    """The largest commit-param run, from the source: the weight, its padded copy, one G1 point per padded
    element (commitment.cu:54) and the generators (llama-ppgen.py), plus the CUDA context."""
    mem, com = costs["memory"], costs["commit"]
    H, I = s.hidden_size, s.intermediate_size  # noqa: E741
    peaks = []
    for rows, cols in ((H, H), (H, I), (I, H)):  # (in, out) as llama-commit.py passes them
        padded = next_power_of_two(rows) * next_power_of_two(cols)
        generators = next_power_of_two(cols << com["generators_log_offset"])
        peaks.append(mem["bytes_per_element"] * (rows * cols + padded) + com["g1_bytes"] * (padded + generators))
    return max(peaks) + mem["cuda_context_gb"] * GB


def step_peaks(s: Shape, model: CostModel) -> dict[str, float]:
    """Each prover step's predicted peak GPU bytes."""
    mem = model.costs["memory"]
    return {
        name: mem["cuda_context_gb"] * GB
        + mem["bytes_per_element"]
        * (
            model.weight_factor * step_elements(s, parts.get("weights") or {})
            + model.activation_factor * step_elements(s, parts.get("activations") or {})
        )
        for name, parts in mem["steps"].items()
    }


def _solve(a1: float, b1: float, y1: float, a2: float, b2: float, y2: float) -> tuple[float, float]:
    """x, y with a1 x + b1 y = y1 and a2 x + b2 y = y2 (Cramer's rule)."""
    det = a1 * b2 - a2 * b1
    return (y1 * b2 - y2 * b1) / det, (a1 * y2 - a2 * y1) / det


def published_shape(seq_len: int, m: dict) -> Shape:
    """The Shape of one published model, all its layers proved."""
    n = m["num_hidden_layers"]
    return Shape(seq_len, m["hidden_size"], m["intermediate_size"], m["num_attention_heads"], n, n)


@dataclass(frozen=True)
class CostModel:
    """The data file and the coefficients fitted to its two published points."""

    costs: dict
    layer_s: float  # per-layer constant of the prover time
    s_per_element: float
    proof_bytes: float  # constant part of a proof
    bytes_per_round: float
    weight_factor: float
    activation_factor: float
    s_per_launch: float  # commit: one ./commit-param run
    s_per_commit_element: float

    @classmethod
    def fit(cls, costs: dict) -> CostModel:
        """Fit every coefficient to the two published points; refuse a fit that is not physical."""
        pub = costs["published"]
        points = [(published_shape(pub["seq_len"], m), m) for m in pub["models"]]
        if len(points) != 2:
            raise ValueError(f"{COSTS_FILE}: the fit needs exactly two published points, not {len(points)}")
        work, mem, launches = costs["work"], costs["memory"], costs["commit"]["params_per_layer"]
        ffn = mem["steps"]["ffn"]

        def fit2(row) -> tuple[float, float]:  # row(shape, figures) -> (a, b, y) of a x + b y = y
            return _solve(*row(*points[0]), *row(*points[1]))

        def room(m: dict) -> float:  # activation and weight elements the published memory holds
            return (m["gpu_memory_gb"] - mem["cuda_context_gb"]) * GB / mem["bytes_per_element"]

        layer_s, s_el = fit2(lambda s, m: (1, work_elements(s, work), m["prover_s"] / s.layers))
        proof_b, per_round = fit2(lambda s, m: (1, proof_rounds(s, work, s.layers), m["proof_kb"] * KB))
        wf, af = fit2(lambda s, m: (step_elements(s, ffn["weights"]), step_elements(s, ffn["activations"]), room(m)))
        per_launch, per_el = fit2(lambda s, m: (launches * s.layers, commit_elements(s), m["commit_s"]))
        model = cls(costs, layer_s, s_el, proof_b, per_round, wf, af, per_launch, per_el)
        bad = [k for k, v in vars(model).items() if k != "costs" and not v > 0]
        if bad:
            raise ValueError(f"{COSTS_FILE}: the fit gives non-positive {', '.join(bad)}; fix the figures or counts")
        for s, _ in points:
            peaks = step_peaks(s, model)
            if max(peaks, key=peaks.__getitem__) != "ffn":
                raise ValueError(f"{COSTS_FILE}: the memory fit assumes the FFN step is the peak, and it is not")
        return model


@functools.cache
def cost_model() -> CostModel:
    """The packaged data file, fitted (once per process)."""
    text = (resources.files("zkllm_hf.prove") / COSTS_FILE).read_text(encoding="utf-8")
    return CostModel.fit(yaml.safe_load(text))


@dataclass(frozen=True)
class Budget:
    """One shape's predicted costs (seconds, bytes) and the GPUs its memory fits on."""

    shape: Shape
    prover_s_per_layer: float
    prover_s: float
    peak_bytes: float
    peak_step: str
    commit_peak_bytes: float
    proof_bytes_per_layer: float  # one layer proved alone, as plan's script proves it
    proof_bytes: float  # all layers proved together, as the paper measured
    commit_s: float
    fits: tuple[str, ...]  # "A100 40 GB", smallest first
    too_small: tuple[str, ...]


def estimate(s: Shape, model: CostModel | None = None) -> Budget:
    """The budget of proving ``s``."""
    model = model or cost_model()
    work = model.costs["work"]
    per_layer = model.layer_s + model.s_per_element * work_elements(s, work)
    peaks = step_peaks(s, model)
    step = max(peaks, key=peaks.__getitem__)
    commit_peak = commit_peak_bytes(s, model.costs)
    gpus = model.costs["gpus"]
    need = max(peaks[step], commit_peak)
    fits, small = [], []
    for g in sorted(gpus["list"], key=lambda g: (g["memory_gb"], g["name"])):
        (fits if need <= gpus["headroom"] * g["memory_gb"] * GB else small).append(f"{g['name']} {g['memory_gb']:g} GB")
    launches = model.costs["commit"]["params_per_layer"] * (s.model_layers or s.layers)
    return Budget(
        shape=s,
        prover_s_per_layer=per_layer,
        prover_s=per_layer * s.layers,
        peak_bytes=peaks[step],
        peak_step=step,
        commit_peak_bytes=commit_peak,
        proof_bytes_per_layer=model.proof_bytes + model.bytes_per_round * proof_rounds(s, work, 1),
        proof_bytes=model.proof_bytes + model.bytes_per_round * proof_rounds(s, work, s.layers),
        commit_s=model.s_per_launch * launches + model.s_per_commit_element * commit_elements(s),
        fits=tuple(fits),
        too_small=tuple(small),
    )


def proving_seq_len(seq_len: int, intermediate_size: int) -> int:
    """The seq_len zkLLM would prove: the capture's, or what --pad-to must make it (a power of two of at least
    1024 whose FFN lookup fits: next_pow2(seq_len x intermediate) >= 2**22, i.e. the product above 2**21)."""
    ffn = next_power_of_two(2 ** (FFN_TABLE_LOG2 - 1) // intermediate_size + 1)
    return max(ATTENTION_MIN_SEQ_LEN, next_power_of_two(seq_len), ffn)


def shape_of(meta: dict, layers: int) -> Shape | str:
    """The Shape of a capture's metadata, proving ``layers`` layers; or why there is none."""
    model, capture, tokens = (
        meta.get(k) if isinstance(meta.get(k), dict) else {} for k in ("model", "capture", "tokens")
    )
    seq = tokens.get("seq_len")
    dims = {
        "seq_len": seq,
        "hidden_size": capture.get("hidden_size"),
        "intermediate_size": model.get("intermediate_size"),
        "num_attention_heads": model.get("num_attention_heads"),
    }
    missing = [k for k, v in dims.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)]
    if missing:
        return f"the capture records no {', '.join(missing)}"
    n = model.get("num_hidden_layers")
    return Shape(
        proving_seq_len(seq, dims["intermediate_size"]),
        dims["hidden_size"],
        dims["intermediate_size"],
        dims["num_attention_heads"],
        layers,
        n if isinstance(n, int) and not isinstance(n, bool) and n >= layers else None,
    )


def duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def size(n: float) -> str:
    return f"{n / KB:.0f} kB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def shape_text(s: Shape, seq: int, kv: object) -> str:
    """The shape the budget is for; the key/value heads and the padding when they differ from the capture's."""
    heads = f"{s.num_attention_heads} heads"
    if isinstance(kv, int) and kv != s.num_attention_heads:
        heads += f" (k and v expanded from {kv}, as zkLLM proves them)"
    padded = "" if seq == s.seq_len else f" (the capture has {seq}: --pad-to {s.seq_len})"
    return (
        f"{s.layers} layer(s), hidden {s.hidden_size}, intermediate {s.intermediate_size}, {heads}, "
        f"seq_len {s.seq_len}{padded}"
    )


def budget_lines(meta: dict, layers: Sequence[int]) -> list[str]:
    """The budget of proving ``layers`` of the capture with ``meta``, as the lines plan and inspect print."""
    head = "proof budget (an estimate, scaled from the zkLLM paper's published figures):"
    s = shape_of(meta, len(layers))
    if isinstance(s, str):
        return [head, f"  not available: {s}"]
    b, model = estimate(s), cost_model()
    seq, kv = meta["tokens"]["seq_len"], meta["model"].get("num_key_value_heads")
    pub = model.costs["published"]
    points = "; ".join(
        f"{m['name']} {m['prover_s']:g} s, {m['proof_kb']:g} kB, {m['gpu_memory_gb']:g} GB" for m in pub["models"]
    )
    gpus = model.costs["gpus"]
    return [
        head,
        f"  shape        {shape_text(s, seq, kv)}",
        f"  prover time  {duration(b.prover_s_per_layer)} per layer, {duration(b.prover_s)} for {s.layers} layer(s)",
        f"  GPU memory   {b.peak_bytes / GB:.2f} GB peak (the {b.peak_step} step); the commit's largest "
        f"./commit-param {b.commit_peak_bytes / GB:.2f} GB",
        f"  proof size   {b.proof_bytes_per_layer / KB:.0f} kB per layer proved alone "
        f"({size(b.proof_bytes_per_layer * s.layers)} for {s.layers} one by one, as plan's script proves them); "
        f"{size(b.proof_bytes)} for the {s.layers} proved together, as the paper does",
        f"  commit       {duration(b.commit_s)}, once per model ({s.model_layers or s.layers} layers): llama-commit.py",
        f"  fits on      {', '.join(b.fits) or 'none of the GPUs listed'} (both peaks within "
        f"{gpus['headroom']:.0%} of the memory)" + (f"; not on {', '.join(b.too_small)}" if b.too_small else ""),
        f"  sources      Sun, Li, Zhang, zkLLM, ACM CCS 2024, on an {pub['gpu']} at seq_len {pub['seq_len']}: "
        f"{points}; step memory counted from zkllm-ccs2024's sources; the model and its assumptions: "
        f"zkllm_hf/prove/{COSTS_FILE}",
        "  caveat       an estimate, not a measurement: two published points fix the fit, timings vary up to 2x "
        "on one GPU, and a real run adds make, model loading and Python per step",
    ]


def budget_of(cap: Any, layers: Sequence[int] | None = None) -> list[str]:
    """:func:`budget_lines` of a ``validate.Capture`` (all its layers unless told)."""
    return budget_lines(cap.metadata, list(cap.layers) if layers is None else list(layers))


__all__ = [
    "Budget",
    "CostModel",
    "Shape",
    "budget_lines",
    "budget_of",
    "cost_model",
    "estimate",
    "proving_seq_len",
    "shape_of",
]
