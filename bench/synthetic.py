"""A synthetic Llama-shaped model of any width and depth that costs almost nothing to run, for capturing and
validating 7B-shaped captures (32 layers x 2048 tokens x hidden 4096, about 7.5 GB) on a small machine.

Its layers have the real Llama residual structure and real ``LlamaRMSNorm`` norms (random weights), so a
capture of it passes every check of the contract, the RMSNorm recomputations and the weights fingerprint
included; attention and MLP are cheap elementwise maps instead of matrix products. It is a plain
``nn.Module`` with a ``LlamaConfig``, so ``zkllm_hf.capture`` and ``zkllm_hf.validate(dir, model=...)`` take it
as they take a Hugging Face model.

    python bench/synthetic.py OUT_DIR [--layers 32] [--seq-len 2048] [--hidden 4096]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm


class _Attention(nn.Module):
    def forward(self, hidden_states: torch.Tensor, **_) -> tuple[torch.Tensor, None]:
        return torch.tanh(hidden_states) * 0.5, None


class _MLP(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 0.25


class _Layer(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(hidden, eps)
        self.self_attn = _Attention()
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps)
        self.mlp = _MLP()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        x = x + self.self_attn(hidden_states=self.input_layernorm(x))[0]
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            _Layer(config.hidden_size, config.rms_norm_eps) for _ in range(config.num_hidden_layers)
        )


class SyntheticLlama(nn.Module):
    """``forward(input_ids)`` runs the layers and returns the last hidden state."""

    def __init__(self, *, layers: int = 32, hidden: int = 4096, vocab: int = 256, seed: int = 0):
        super().__init__()
        self.config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        )
        self.config._name_or_path = f"synthetic-llama-{layers}x{hidden}"
        self.model = _Decoder(self.config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(torch.randn(vocab, hidden, generator=g) * 2)
            for layer in self.model.layers:
                layer.input_layernorm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
                layer.post_attention_layernorm.weight.copy_(torch.rand(hidden, generator=g) + 0.5)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return x


def write_capture(
    out: str, *, layers: int = 32, seq_len: int = 2048, hidden: int = 4096
) -> tuple[SyntheticLlama, float]:
    """Capture one forward of the synthetic model into ``out`` (replacing a previous capture); returns the
    model and the seconds the capture took."""
    import zkllm_hf

    model = SyntheticLlama(layers=layers, hidden=hidden)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.inference_mode(), zkllm_hf.capture(model, out, overwrite=True):
        model(ids)
    return model, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args(argv)
    _, seconds = write_capture(args.out, layers=args.layers, seq_len=args.seq_len, hidden=args.hidden)
    size = 7 * args.layers * args.seq_len * args.hidden * 4
    shape = f"{args.layers} layers x {args.seq_len} x {args.hidden}"
    print(f"wrote {args.out}: {shape}, {size / 1e9:.2f} GB in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
