"""Run one of zkLLM's own Python scripts, unchanged, on a model folder of our choosing, under transformers 5:
``python -m zkllm_hf.zkllm_run --model-dir DIR -- llama-self-attn.py ARGS...`` from the zkLLM folder.

zkLLM's scripts (jvhs0706/zkllm-ccs2024 993311e) load ``meta-llama/Llama-2-{7,13}b-hf`` by name
(``AutoModelForCausalLM.from_pretrained(model_card, local_files_only = True, cache_dir = "./model-storage")``,
llama-rmsnorm.py:26, llama-self-attn.py:34, llama-ffn.py:33, llama-commit.py:26-27 with ``AutoTokenizer``,
llama-ppgen.py:17-18), read two attributes transformers 4.48 removed from ``LlamaAttention``
(``layer.self_attn.num_heads`` at llama-self-attn.py:44-46 and ``layer.self_attn.rotary_emb`` at 48-49), and
ignore the exit status of every binary they start with ``os.system`` (llama-rmsnorm.py:45,
llama-self-attn.py:40,74, llama-ffn.py:43, llama-skip-connection.py:26, llama-commit.py:44,46,
llama-ppgen.py:31). Inside :func:`zkllm_environment` (and so under this launcher):

- ``from_pretrained`` of ``AutoModelForCausalLM``, ``LlamaForCausalLM`` and ``AutoTokenizer`` loads ``DIR``,
  whatever name the script passes (``dtype="auto"``: the folder's own dtype); a folder without a tokenizer gives
  ``None`` (ppgen and commit assign the tokenizer and never use it);
- every decoder layer's ``self_attn`` gets ``num_heads`` (``config.num_attention_heads``; the view at
  llama-self-attn.py:44 needs ``num_heads * head_dim == embed_dim``) and ``rotary_emb``, the model's own
  ``LlamaRotaryEmbedding``: called as ``rotary_emb(x, position_ids)`` it returns ``(cos, sin)`` of shape
  ``(1, seq_len, head_dim)`` in ``x``'s dtype with the model's rope parameters, which is what the script
  multiplies ``Q`` and ``K`` of shape ``(heads, seq_len, head_dim)`` by (line 51);
- ``os.system`` flushes Python's output first (so the log's lines stay whole) and raises ``SystemExit`` when the
  command exits non-zero or dies of a signal, naming it: no binary's failure passes silently.

``--weights SHA256`` (alone, without a script) loads the model as the scripts do and exits 1 unless its
zkllm-hf weights fingerprint is that one: the proving script's check that zkLLM proves the weights captured.
The user's zkLLM checkout is never written to by this module.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXIT_MISMATCH = 1
EXIT_USAGE = 2


def _say(message: str) -> None:
    print(f"zkllm_run: {message}", file=sys.stderr, flush=True)


def describe_status(command: str, status: int) -> tuple[str, int]:
    """What a non-zero ``os.system`` status means, and the exit code to pass on (128 + N for signal N)."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        sig = signal.Signals(-code)
        return f"{command!r} was killed by {sig.name} ({signal.strsignal(sig)})", 128 + sig.value
    if code > 128 and code - 128 in signal.valid_signals():
        sig = signal.Signals(code - 128)
        why = f"the shell's report of {sig.name}, {signal.strsignal(sig)}"
        return f"{command!r} exited with status {code} ({why})", code
    return f"{command!r} exited with status {code}", code


def checked_system(real: Any = os.system) -> Any:
    """An ``os.system`` that raises SystemExit (after saying why) when the command fails or is killed."""

    def system(command: str) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        status = real(command)
        if status:
            message, code = describe_status(command, status)
            _say(message)
            raise SystemExit(code)
        return status

    system.checked = True  # type: ignore[attr-defined]
    return system


def add_removed_attributes(model: Any) -> Any:
    """Give each decoder layer's attention the ``num_heads`` and ``rotary_emb`` zkLLM's self-attn script reads,
    where transformers no longer has them. ``rotary_emb`` is the model's shared rotary module, kept out of the
    module tree (no parameter, buffer or state-dict entry is added)."""
    inner = getattr(model, "model", None)
    rope = getattr(inner, "rotary_emb", None)
    for layer in getattr(inner, "layers", []):
        attn = layer.self_attn
        if not hasattr(attn, "num_heads"):
            attn.__dict__["num_heads"] = int(model.config.num_attention_heads)
        if not hasattr(attn, "rotary_emb") and rope is not None:
            attn.__dict__["rotary_emb"] = rope
    return model


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


@contextlib.contextmanager
def zkllm_environment(model_dir: Path) -> Iterator[None]:
    """transformers' loaders pointed at ``model_dir``, the removed attributes provided and ``os.system`` checked,
    for the duration of the block (everything is restored after it)."""
    import transformers

    model_dir = Path(model_dir).resolve()
    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def model_loader(cls: Any) -> Any:
        original = cls.from_pretrained.__func__

        def from_pretrained(klass: Any, _name: Any = None, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("cache_dir", None)
            kwargs.setdefault("dtype", "auto")
            return add_removed_attributes(original(klass, str(model_dir), *args, **kwargs))

        return classmethod(from_pretrained)

    def tokenizer_loader(cls: Any) -> Any:
        original = cls.from_pretrained.__func__

        def from_pretrained(klass: Any, _name: Any = None, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("cache_dir", None)
            return original(klass, str(model_dir), *args, **kwargs) if _has_tokenizer(model_dir) else None

        return classmethod(from_pretrained)

    try:
        for cls in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
            patch(cls, "from_pretrained", model_loader(cls))
        patch(transformers.AutoTokenizer, "from_pretrained", tokenizer_loader(transformers.AutoTokenizer))
        saved.append((os, "system", os.system))
        os.system = checked_system(os.system)
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


_MISSING = object()


def check_weights(expected: str) -> int:
    """Load the model as zkLLM's scripts do and compare its weights fingerprint with ``expected``."""
    from transformers import AutoModelForCausalLM

    from .provenance import weights_fingerprint

    model = AutoModelForCausalLM.from_pretrained(
        "meta-llama/Llama-2-7b-hf", local_files_only=True, cache_dir="./model-storage"
    )  # as llama-commit.py:27 calls it
    have = weights_fingerprint(model)
    if have != expected:
        _say(
            f"the model zkLLM would load has weights fingerprint {have}, not {expected} (the capture's, or its "
            f"recorded expansion's): zkLLM would prove another model; give plan --model-dir the folder "
            f"zkllm-hf export-zkllm-model writes for this capture"
        )
        return EXIT_MISMATCH
    print(f"zkllm_run: the model zkLLM loads carries weights fingerprint {have}", flush=True)
    return 0


def run_script(script: str, args: list[str]) -> None:
    """Run ``script`` as ``python script args`` would: as ``__main__``, its folder first on sys.path."""
    path = Path(script)
    sys.argv = [script, *args]
    sys.path.insert(0, str(path.resolve().parent))
    runpy.run_path(str(path), run_name="__main__")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m zkllm_hf.zkllm_run",
        description="Run a zkLLM script unchanged on --model-dir, under transformers 5, failing on a binary's "
        "failure. Run it from the zkLLM folder.",
    )
    p.add_argument("--model-dir", required=True, help="the model folder every from_pretrained loads")
    p.add_argument("--weights", metavar="SHA256", help="exit 1 unless that folder's weights have this fingerprint")
    p.add_argument("script", nargs="?", help="the zkLLM script (in the current folder), e.g. llama-ffn.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        at = argv.index("--")
        opts, rest = argv[:at], argv[at + 1 :]
    else:
        opts, rest = argv, []
    args = _parse(opts + rest[:1])
    model_dir = Path(args.model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        _say(f"--model-dir {model_dir}: no config.json there; give the folder zkllm-hf export-zkllm-model wrote")
        return EXIT_USAGE
    if args.script and not Path(args.script).is_file():
        _say(f"{args.script}: no such script in {Path.cwd()}; run this from the zkLLM folder")
        return EXIT_USAGE
    if args.script and Path(args.script).resolve().parent != Path.cwd().resolve():
        _say(f"{args.script} is not in the current folder {Path.cwd()}; zkLLM's scripts run from the zkLLM folder")
        return EXIT_USAGE
    if not args.script and not args.weights:
        _say("give --weights SHA256, or a script after --")
        return EXIT_USAGE
    with zkllm_environment(model_dir):
        if args.weights:
            code = check_weights(args.weights)
            if code or not args.script:
                return code
        run_script(args.script, rest[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
