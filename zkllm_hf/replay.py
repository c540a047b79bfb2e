"""``validate(dir, model=m, replay=True)``: re-run each unit's recorded forwards through ``m`` and compare.

The replay goes through the capture engine itself (the same hooks, slicing, quantisation and checks), with a
:class:`~zkllm_hf.replay_compare.ComparatorSink` as its output stage: nothing is written, every point of
every unit is compared with its file as the layer completes. Forwards are rebuilt as they ran
(:mod:`~zkllm_hf.replay_inputs`): the whole batch with its padding, the mask as passed, the position ids, and
for ``generate()`` steps the cache, rebuilt by replaying the cache's earlier forwards in order.

The contract's ``replay`` entries judge each point (:mod:`~zkllm_hf.contracts.replay_checks`). ``exact`` runs
when the replay runs as the capture did (:func:`differences` is empty); ``tolerant`` always runs. When the
replay does not run as the capture did, each captured layer whose previous layer is captured too runs on the
capture's own dequantised ``block_input`` (teacher forcing, :func:`_forced`): the chain check binds that input
to the previous layer's ``block_output``, which the replay compares, and each layer's deviation is then its
own kernels' noise, not the noise of every layer before it. When a unit
diverges, the first diverging layer L is replayed again with layer L's input replaced by the capture's own
dequantised ``block_input`` (:func:`localise`), which says whether layer L's computation diverged or its input.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .contracts import CheckResult, Contract, ReplayStats, implementation
from .engine import CaptureEngine, CaptureError, Route
from .hooks import find_layout
from .options import CaptureOptions
from .points import POINTS, POINTS_BY_NAME
from .replay_compare import ComparatorSink, ExpectedFile
from .replay_inputs import ForwardPlan, ReplayUnit, plan_forwards, read_units
from .unit import UnitRecorder

__all__ = ["ReplayOutcome", "differences", "replay_capture"]

MATH_LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes")
HALF = ("bfloat16", "float16")
"""Source dtypes whose values the codes hold exactly (at magnitudes above 2**-9 and 2**-6): their dequantised
``ffn_input`` is the one the model computed."""
MODEL_POINTS = ("block_input", "input_layernorm_output", "attn_output", "ffn_input", "mlp_output")
"""The points an exact-int capture holds as the model computed them (the other two are derived in int32)."""


@dataclass
class ReplayOutcome:
    """What a replay found: one result per (entry, unit, point), the verdict it ran under, the localisation."""

    results: list[CheckResult]
    exact: bool  # the exact entry applied
    differences: list[str]  # what differs from the capture's run, when not exact
    localisation: dict[str, Any] | None = None
    stats: list[ReplayStats] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": "exact" if self.exact else "tolerant",
            "differences": self.differences,
            "localisation": self.localisation,
            "points": [
                {"unit": s.unit, "layer": s.layer, "point": s.point, **s.to_dict()}
                for s in self.stats
                if s.equal != s.elements or s.note
            ],
        }


def _device_types(devices: Any) -> list[str]:
    items = devices if isinstance(devices, list) else [devices]
    flat = [d for x in items for d in (x if isinstance(x, list) else [x])]
    return sorted({str(d).split(":")[0] for d in flat})


def differences(meta: Mapping[str, Any], model: nn.Module) -> list[str]:
    """What the replay on ``model`` runs with that the capture did not (empty: the exact verdict applies)."""
    ran, recorded = provenance.runtime(model), dict(meta.get("runtime") or {})
    model_meta, now_model = dict(meta.get("model") or {}), provenance.model_info(model, fingerprint=False)
    out = []
    pairs = [
        ("device type", _device_types(recorded.get("devices")), _device_types(ran["devices"])),
        ("model.dtype", model_meta.get("dtype"), now_model["dtype"]),
        ("model.quantization", model_meta.get("quantization"), now_model["quantization"]),
        ("runtime.torch_threads", recorded.get("torch_threads"), ran["torch_threads"]),
        ("runtime.attn_implementation", recorded.get("attn_implementation"), ran["attn_implementation"]),
        ("runtime.deterministic_algorithms", recorded.get("deterministic_algorithms"), ran["deterministic_algorithms"]),
    ]
    versions, now = dict(meta.get("versions") or {}), provenance.versions()
    pairs += [(f"versions.{lib}", versions.get(lib), now.get(lib)) for lib in MATH_LIBRARIES]
    for name, then, here in pairs:
        if then != here:
            out.append(f"{name}: captured {then}, replay {here}")
    return out


def _expected(units: Sequence[ReplayUnit]):
    by_folder = {u.folder: u for u in units}

    def find(name: str) -> ExpectedFile | None:
        folder, _, base = name.rpartition("/")
        u = by_folder.get(folder)
        row = u.rows.get(base) if u is not None else None
        if row is None:
            return None
        return ExpectedFile(u.path / base, base, int(row["rows"]), int(row["cols"]), str(row["source_dtype"]))

    return find


@contextlib.contextmanager
def _engine(model: nn.Module, meta: Mapping[str, Any], contract: Contract, sink: ComparatorSink, **over: Any):
    """A capture engine as the capture's was (layers, scale, residual mode), its output the comparator."""
    capture = meta["capture"]
    layers = over.get("layers", capture["layers"])
    options = CaptureOptions.build(
        len(find_layout(model).layers),
        mode="forward",
        layers=list(layers),
        scale_log2=int(capture["scale_log2"]),
        contract=contract.folder,
        residuals=over.get("residuals", capture.get("residuals", "model")),
    )
    engine = CaptureEngine(model, Path("replay"), options=options, sink=lambda: sink)
    try:
        yield engine
    finally:
        engine.detach()


def _autocast(meta: Mapping[str, Any], device: torch.device):
    state = (meta.get("runtime") or {}).get("autocast") or {}
    if not state.get("enabled"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, str(state.get("dtype")), None))


def _run(engine: CaptureEngine, model: nn.Module, plans: Sequence[ForwardPlan], hooks=()) -> dict[int, UnitRecorder]:
    """Run each forward as it ran, the engine routing each unit's rows as the capture did."""
    recorders: dict[int, UnitRecorder] = {}
    current: list[Route] = []
    engine.attach(lambda fwd: current)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    caches: dict[tuple[str, int], Any] = {}
    try:
        for plan in plans:
            current[:] = [Route(r.row, r.cols, _recorder(engine, recorders, r.unit)) for r in plan.routes]
            cache = _cache(plan, caches)
            for hook in hooks:
                hook.forward = plan
            kwargs: dict[str, Any] = {"input_ids": plan.input_ids.to(device), "use_cache": cache is not None}
            if plan.mask is not None:
                kwargs["attention_mask"] = plan.mask.to(device=device, dtype=torch.long)
            if plan.position_ids is not None:
                kwargs["position_ids"] = plan.position_ids.to(device)
            if cache is not None:
                kwargs[_cache_argument(model)] = cache
            meta = plan.routes[0].unit.meta if plan.routes else {}
            with torch.inference_mode(), _autocast(meta, device):
                model(**kwargs)
            caches[(plan.group, plan.index)] = cache
    finally:
        engine.detach()
    return recorders


def _cache_argument(model: nn.Module) -> str:
    """``cache`` where the model's forward takes it (transformers 5.24 deprecates ``past_key_values``)."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _recorder(engine: CaptureEngine, recorders: dict[int, UnitRecorder], unit: ReplayUnit) -> UnitRecorder:
    rec = recorders.get(id(unit))
    if rec is None:
        info = unit.meta.get("unit") or {}
        rec = UnitRecorder(engine, int(info.get("sample", 0)), int(info.get("step", 0)), "forward", unit.folder)
        rec.named = True
        recorders[id(unit)] = rec
    return rec


def _cache(plan: ForwardPlan, caches: dict[tuple[str, int], Any]) -> Any:
    from transformers import DynamicCache

    cont = plan.record.get("continues")
    if isinstance(cont, int):
        cache = caches.pop((plan.group, cont), None)
        if cache is None:
            raise CaptureError(f"forward {plan.index} continues forward {cont}'s cache, which the replay did not run")
    elif plan.record.get("cache") or plan.record.get("past_length"):
        cache = DynamicCache()
    else:
        return None
    past = int(cache.get_seq_length())
    if past != int(plan.record.get("past_length") or 0):
        raise CaptureError(
            f"forward {plan.index}: the rebuilt cache holds {past} positions, the capture's held "
            f"{plan.record.get('past_length')}"
        )
    return cache


class _Substitute:
    """A pre-hook on layer L that replaces one unit's rows of the layer's input with the capture's own
    dequantised ``block_input`` (the localisation replay, and each chained layer of a tolerant replay), or,
    on the layer's MLP, its input with the capture's ``ffn_input``."""

    def __init__(self, unit: ReplayUnit, layer: int, scale_log2: int, point: str = "block_input"):
        row = unit.rows.get(POINTS_BY_NAME[point].file_name(layer))
        if row is None:
            raise CaptureError(f"layer {layer} has no {point} file to replay it on")
        self.path, self.cols = unit.path / str(row["file"]), int(row["cols"])
        self.scale = float(2**scale_log2)
        self.unit = unit
        self.forward: ForwardPlan | None = None

    def _rows(self, start: int, count: int) -> torch.Tensor:
        import numpy as np

        codes = np.fromfile(self.path, dtype="<i4", count=count * self.cols, offset=start * self.cols * 4)
        if codes.size != count * self.cols:
            raise CaptureError(f"{self.path.name} holds fewer rows than the replay's forwards need")
        return torch.from_numpy(codes.reshape(count, self.cols).astype("float64")) / self.scale

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.forward
        mine = [r for r in plan.routes if r.unit is self.unit] if plan is not None else []
        if not mine:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.clone()
        for r in mine:
            width = len(range(hidden.shape[1])[r.cols]) if isinstance(r.cols, slice) else int(r.cols.numel())
            rows = self._rows(r.offset, width).to(device=hidden.device, dtype=hidden.dtype)
            hidden[r.row, r.cols if isinstance(r.cols, slice) else r.cols.to(hidden.device)] = rows
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


@contextlib.contextmanager
def _forced(model: nn.Module, units: Sequence[ReplayUnit], layers: Sequence[int], scale_log2: int):
    """Teacher forcing: every captured layer whose previous layer is captured too runs, for each unit's rows,
    on the capture's own dequantised ``block_input`` (the chain check binds it to the previous layer's
    ``block_output``, which the replay compares), and every captured layer's MLP on the capture's ``ffn_input``
    (bound to ``post_attn_residual`` by the norm check, and that to ``attn_output`` by skip #1) when it is half
    precision, so the kernel noise of the layers and sublayers before is not carried in. A float32 ``ffn_input``
    is not substituted: its codes round it to half an LSB, tens of float32 ulps, which the MLP amplifies."""
    layout = find_layout(model)
    pairs = [(layout.layers[layer], _Substitute(u, layer, scale_log2)) for layer in layers if layer - 1 in set(layers)
             for u in units]  # fmt: skip
    mlp, ffn = POINTS_BY_NAME["mlp_output"].module, POINTS_BY_NAME["ffn_input"]
    pairs += [(layout.module(layer, mlp), _Substitute(u, layer, scale_log2, "ffn_input"))
              for layer in layers for u in units
              if str((u.rows.get(ffn.file_name(layer)) or {}).get("source_dtype")) in HALF]  # fmt: skip
    handles = [module.register_forward_pre_hook(h, with_kwargs=True, prepend=True) for module, h in pairs]
    try:
        yield [h for _, h in pairs]
    finally:
        for handle in handles:
            handle.remove()


def _judge(contract: Contract, stats: Sequence[ReplayStats], exact: bool, why: str) -> list[CheckResult]:
    results = []
    for spec in contract.entries(scope="replay"):
        if spec.params.get("verdict") == "exact" and not exact:
            results.append(CheckResult(spec.name, False, skipped=f"the replay does not run as the capture ran ({why})"))
            continue
        results += [implementation(spec)(spec, s) for s in stats]
    return results


def _first_divergence(results: Sequence[CheckResult], order: Sequence[str]) -> CheckResult | None:
    rank = {p.name: i for i, p in enumerate(POINTS)}
    failed = [r for r in results if r.failed and r.layer is not None]
    if not failed:
        return None
    return min(failed, key=lambda r: (order.index(r.unit or ""), r.layer, rank.get(str(r.point), 99)))


def localise(
    model: nn.Module, units: Sequence[ReplayUnit], plans: Sequence[ForwardPlan], first: CheckResult, contract: Contract
) -> dict[str, Any]:
    """Replay ``first``'s layer alone on its captured block_input; say whether the layer or its input diverged."""
    unit = next(u for u in units if (u.label or "") == (first.unit or ""))
    layer = int(first.layer)
    meta, scale = unit.meta, int(unit.meta["capture"]["scale_log2"])
    points = MODEL_POINTS if meta["capture"].get("residuals") == "exact-int" else [p.name for p in POINTS]
    sink = ComparatorSink(_expected(units), scale, only={(unit.folder, layer)}, points=points)
    hook = _Substitute(unit, layer, scale)
    handle = find_layout(model).layers[layer].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        with _engine(model, meta, contract, sink, layers=[layer], residuals="model") as engine:
            groups = {p.group for p in plans if any(r.unit is unit for r in p.routes)}
            _run(engine, model, [p for p in plans if p.group in groups], [hook])
    finally:
        handle.remove()
    tolerant = [s for s in contract.entries(scope="replay") if s.params.get("verdict") == "tolerant"]
    verdicts = [implementation(tolerant[0])(tolerant[0], s) for s in sink.finish()] if tolerant else []
    still = [v for v in verdicts if v.failed]
    where = f"{first.unit + ' ' if first.unit else ''}layer {layer} {first.point}"
    if still:
        same = [v for v in still if v.point == first.point]
        worst = same[0] if same else max(still, key=lambda v: v.max_ratio or 0.0)
        verdict = "layer"
        text = (
            f"{where} diverges first; replayed alone on its captured block_input, layer {layer} still diverges "
            f"({worst.point}: {worst.message}): the layer's own computation diverged"
        )
    else:
        verdict = "input"
        text = (
            f"{where} diverges first; replayed alone on its captured block_input, layer {layer} reproduces the "
            f"captured points: its input diverged (the recorded inputs, or what earlier layers computed)"
        )
    return {"unit": first.unit or "", "layer": layer, "point": first.point, "diverged": verdict, "message": text,
            "isolated": [v.to_dict() for v in verdicts if v.failed]}  # fmt: skip


def _drift(contract: Contract, recorders: Mapping[int, UnitRecorder], units: Sequence[ReplayUnit], exact: bool):
    """Exact-int: the replay's drift (the model's own residual points against the int32 derivation) against the
    drift the capture recorded, per (layer, point); equal under the exact verdict, reported under the tolerant."""
    by_verdict = {s.params.get("verdict"): s.name for s in contract.entries(scope="replay")}
    exact = exact and "exact" in by_verdict  # without an exact entry the drift is judged as the tolerant one is
    name = by_verdict.get("exact" if exact else "tolerant")
    if name is None:
        return []  # the contract holds no replay entry to judge it
    out = []
    for u in units:
        rec = recorders.get(id(u))
        recorded = {(int(d["layer"]), str(d["point"])): d for d in (u.meta.get("residuals") or {}).get("drift") or []}
        if rec is None or not recorded:
            continue
        for key, then in recorded.items():
            now = rec.drift.get(key, {})
            a, b = then.get("max_dev_lsb"), now.get("max_dev_lsb")
            ok = (a == b) or not exact
            out.append(CheckResult(name, ok, "" if ok else f"exact-int drift: captured {a} LSB, replay {b} LSB",
                                   layer=key[0], point=f"{key[1]} (drift)", unit=u.label or None))  # fmt: skip
    return out


def replay_capture(path: Path, model: nn.Module, contract: Contract) -> ReplayOutcome:
    """Replay every unit of the capture at ``path`` through ``model``; the contract's replay verdicts."""
    units = read_units(path)
    plans = plan_forwards(units)
    runnable = [u for u in units if not u.skip]
    skipped = [
        CheckResult(
            next(iter(sorted(contract.names_of("replay"))), "replay"),
            False,
            unit=u.label or None,
            skipped=f"cannot replay this unit: {u.skip}",
        )  # fmt: skip
        for u in units
        if u.skip
    ]
    if not runnable:
        return ReplayOutcome(skipped, False, [])
    meta = runnable[0].meta
    diff = differences(meta, model)
    exact = not diff
    sink = ComparatorSink(_expected(runnable), int(meta["capture"]["scale_log2"]))
    live = {p.group for p in plans if p.routes}
    plans = [p for p in plans if p.group in live]  # a group none of whose units can run is not run
    force = not exact and meta["capture"].get("residuals", "model") != "exact-int"
    scale = int(meta["capture"]["scale_log2"])
    try:
        layers = list(meta["capture"]["layers"]) if force else []
        with _forced(model, runnable, layers, scale) as hooks, _engine(model, meta, contract, sink) as engine:
            recorders = _run(engine, model, plans, hooks)
    except (CaptureError, ValueError, RuntimeError) as exc:
        name = next(iter(sorted(contract.names_of("replay"))), "replay")
        return ReplayOutcome([*skipped, CheckResult(name, False, f"the replay could not run: {exc}")], exact, diff)
    stats = [*sink.finish(), *_missing(runnable, sink.stats.values())]
    label = {u.folder: u.label for u in units}
    for s in stats:
        s.unit = label.get(s.unit, s.unit)
    results = _judge(contract, stats, exact, "; ".join(diff))
    if meta["capture"].get("residuals") == "exact-int":
        results += _drift(contract, recorders, runnable, exact)
    outcome = ReplayOutcome([*skipped, *results], exact, diff, stats=stats)
    first = _first_divergence(results, [u.label or "" for u in units])
    if first is not None and first.point in {p.name for p in POINTS}:
        try:
            outcome.localisation = localise(model, runnable, plans, first, contract)
        except (CaptureError, ValueError, RuntimeError, OSError) as exc:
            where = f"{first.unit + ' ' if first.unit else ''}layer {first.layer} {first.point}"
            outcome.localisation = {"unit": first.unit or "", "layer": first.layer, "point": first.point,
                                    "diverged": None, "message": f"{where} diverges first; localisation could not "
                                    f"run: {exc}"}  # fmt: skip
    return outcome


def _missing(units: Sequence[ReplayUnit], stats: Sequence[ReplayStats]) -> list[ReplayStats]:
    """A file the manifest lists that the replay never produced is a divergence too."""
    seen = {(s.unit, s.layer, s.point) for s in stats}
    out = []
    for u in units:
        for base, row in u.rows.items():
            key = (u.folder, int(row["layer"]), str(row["point"]))
            if key not in seen:
                s = ReplayStats(u.folder, key[1], key[2], base, str(row["source_dtype"]), int(row["rows"]))
                s.note = "the replay did not compute this point"
                out.append(s)
    return out
