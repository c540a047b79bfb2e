"""The peers doing zkllm-hf's job, for bench_speed.py: the seven points of every decoder layer of one forward,
written as zkLLM's int32 files at 2**16 (``round(x * 2**16)``, half to even, as ``torch.round``). None of
them checks, hashes or writes a manifest.

- ``hooks``: hand-written PyTorch hooks that clone each point, then convert and write after the forward;
- ``nnsight`` (0.8): ``NNsight(model).trace(ids)`` saving each point (``.input`` / ``.output``);
- ``torchlens`` (2.36): ``tl.trace(model, ids, save=<module selectors>)``, each point read as its module's
  output op (``.out``); attention's from ``o_proj`` (``self_attn`` returns a tuple, an ambiguous lookup)
  and the two residual sums (``block_input + attn_output``, ``post_attn_residual + mlp_output``; the layer
  output and the next block input) recomputed with the model's own add in the same dtype, so the same
  bits (the decoder layer's address is an ambiguous lookup too).

Each peer is a class with ``run(ids, out)``; :func:`available` lists those whose package is installed (the
``bench`` extra). TransformerLens 4.3 is in the extra too, but its ``TransformerBridge`` boots a model from
the Hub by name and switches it to eager attention, so it is not the same job on an offline local model:
it is not run here (bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import numpy as np
import torch

SUFFIXES = ("block-input", "norm-in", "attn", "resid", "ffn-in", "mlp", "block-output")


def write_codes(t: torch.Tensor, path: Path) -> None:
    """One point as zkLLM's file: int32 codes of ``round(x * 2**16)`` (half to even), row-major."""
    np.round(t.detach()[0].float().numpy() * 2**16).astype(np.int32).tofile(path)


class Hooks:
    """Hand-written hooks: clone the seven points of every layer, then quantise and write each with numpy."""

    name = "hooks"

    def __init__(self, model):
        self.model = model

    def run(self, ids, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        saved: list[tuple[str, torch.Tensor]] = []
        handles = []

        def keep(name):
            def hook(module, args, output=None):
                t = output if output is not None else args[0]
                t = t[0] if isinstance(t, tuple) else t
                saved.append((name, t.detach().clone()))

            return hook

        for i, layer in enumerate(self.model.model.layers):
            handles += [
                layer.register_forward_pre_hook(lambda m, a, i=i: keep(f"{i}-block-input")(m, a)),
                layer.input_layernorm.register_forward_hook(keep(f"{i}-norm-in")),
                layer.self_attn.register_forward_hook(keep(f"{i}-attn")),
                layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, i=i: keep(f"{i}-resid")(m, a)),
                layer.post_attention_layernorm.register_forward_hook(keep(f"{i}-ffn-in")),
                layer.mlp.register_forward_hook(keep(f"{i}-mlp")),
                layer.register_forward_hook(keep(f"{i}-block-output")),
            ]
        try:
            self.model(input_ids=ids)
        finally:
            for h in handles:
                h.remove()
        for name, t in saved:
            write_codes(t, out / f"layer-{name}.bin")
        saved.clear()


class Nnsight:
    name = "nnsight"

    def __init__(self, model):
        import nnsight

        self.nnsight = nnsight
        self.model = nnsight.NNsight(model)
        self.layers = len(model.model.layers)

    def run(self, ids, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with self.model.trace(ids):
            saved = self.nnsight.save([])
            for layer in self.model.model.layers:  # in the order the forward reaches them
                saved.append(layer.input.save())
                saved.append(layer.input_layernorm.output.save())
                saved.append(layer.self_attn.output[0].save())
                saved.append(layer.post_attention_layernorm.input.save())
                saved.append(layer.post_attention_layernorm.output.save())
                saved.append(layer.mlp.output.save())
                saved.append(layer.output.save())
        for k, t in enumerate(saved):
            write_codes(t, out / f"layer-{k // 7}-{SUFFIXES[k % 7]}.bin")
        saved.clear()


class Torchlens:
    name = "torchlens"

    def __init__(self, model):
        import torchlens

        self.tl = torchlens
        self.model = model
        n = len(model.model.layers)
        names = ["model.embed_tokens"]
        for i in range(n):
            base = f"model.layers.{i}"
            names += [f"{base}.input_layernorm", f"{base}.self_attn.o_proj", f"{base}.post_attention_layernorm"]
            names += [f"{base}.mlp"]
        self.names, self.n = names, n
        self.selector = functools.reduce(operator.or_, [torchlens.module(a) for a in names])

    def run(self, ids, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tr = self.tl.trace(self.model, ids, save=self.selector)
        prev = tr["model.embed_tokens"].out
        for i in range(self.n):
            base = f"model.layers.{i}"
            attn = tr[f"{base}.self_attn.o_proj"].out
            resid, mlp = prev + attn, tr[f"{base}.mlp"].out
            points = [prev, tr[f"{base}.input_layernorm"].out, attn, resid]
            points += [tr[f"{base}.post_attention_layernorm"].out, mlp, resid + mlp]
            for suffix, t in zip(SUFFIXES, points):
                write_codes(t, out / f"layer-{i}-{suffix}.bin")
            prev = points[-1]
        del tr


PEERS = (Hooks, Nnsight, Torchlens)


def available(model) -> list:
    """An instance of each peer whose package is installed."""
    peers = []
    for cls in PEERS:
        try:
            peers.append(cls(model))
        except ImportError:
            continue
    return peers


def same_files(peer_dir: Path, capture_dir: Path, layers: int) -> bool:
    """Whether the peer's files hold zkllm-hf's bytes, point by point."""
    from zkllm_hf.points import POINTS

    for layer in range(layers):
        for suffix, point in zip(SUFFIXES, POINTS):
            theirs = (peer_dir / f"layer-{layer}-{suffix}.bin").read_bytes()
            ours = (capture_dir / point.file_name(layer)).read_bytes()
            if theirs != ours:
                return False
    return True
