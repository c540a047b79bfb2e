"""CaptureCallback with transformers.Trainer: eval/predict forwards only, first max_samples, de-padded."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY, make_tiny

import zkllm_hf
from zkllm_hf.points import POINTS_BY_NAME

LENGTHS = (5, 9, 3, 7, 6)


def samples(seed: int, lengths=LENGTHS) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, TINY["vocab_size"], (n,), generator=g).tolist()} for n in lengths]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding with pad id 0, as DataCollatorWithPadding does by default; labels -100 on padding."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer(model, tmp_path, callbacks=(), **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        str(tmp_path / "trainer"),
        per_device_eval_batch_size=2,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        **args,
    )
    return Trainer(model=model, args=targs, train_dataset=samples(7), eval_dataset=samples(0),
                   data_collator=collate, callbacks=list(callbacks))


def timeless(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "runtime" not in k and "per_second" not in k and "preparation" not in k}


def test_predictions_and_metrics_unchanged_and_first_samples_captured(tmp_path):
    model = make_tiny()
    cb = zkllm_hf.CaptureCallback(tmp_path / "acts", max_samples=3, on="predict")
    with_cb = trainer(model, tmp_path, [cb]).predict(samples(0))
    without = trainer(make_tiny(), tmp_path).predict(samples(0))
    assert np.array_equal(with_cb.predictions, without.predictions)
    assert np.array_equal(with_cb.label_ids, without.label_ids)
    assert timeless(with_cb.metrics) == timeless(without.metrics)
    ds = zkllm_hf.load_capture(tmp_path / "acts")
    assert sorted(ds.units) == [(0, 0), (1, 0), (2, 0)]  # the first three, across two batches
    for i, sample in enumerate(samples(0)[:3]):
        unit = ds.unit(i)
        assert unit.metadata["tokens"]["input_ids"] == sample["input_ids"]  # de-padded
        assert unit.metadata["unit"]["batch"] == i // 2 and unit.metadata["unit"]["row"] == i % 2
        assert unit.metadata["runtime"]["autocast"]["enabled"] is False
    assert ds.metadata["trainer"]["on"] == "predict" and ds.metadata["capture"]["mode"] == "predict"
    assert zkllm_hf.validate(tmp_path / "acts", model=model).ok
    # the files are the model's own activations for each sample alone
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([samples(0)[1]["input_ids"]]), output_hidden_states=True).hidden_states
    got = np.asarray(ds.unit(1).codes(1, "block_input"))
    assert np.abs(got / 2**16 - hs[1][0].double().numpy()).max() <= 2**-17


def test_training_forwards_are_never_captured(tmp_path):
    """Evaluate runs inside train() after training steps; only eval samples are captured."""
    cb = zkllm_hf.CaptureCallback(tmp_path / "acts", max_samples=2, on="evaluate")
    t = trainer(make_tiny(), tmp_path, [cb], max_steps=2, eval_strategy="steps", eval_steps=2)
    t.train()
    ds = zkllm_hf.load_capture(tmp_path / "acts")
    eval_ids = [s["input_ids"] for s in samples(0)]
    assert [u.metadata["tokens"]["input_ids"] for u in ds] == eval_ids[:2]
    assert cb.result is not None and len(cb.result.units) == 2
    t.evaluate()  # a second evaluation does not touch the finished capture
    assert zkllm_hf.validate(tmp_path / "acts").ok


def test_other_loop_is_discarded(tmp_path):
    cb = zkllm_hf.CaptureCallback(tmp_path / "acts", max_samples=4, on="predict")
    t = trainer(make_tiny(), tmp_path, [cb])
    t.evaluate()
    assert not (tmp_path / "acts").exists() and cb.result is None
    assert not [p for p in tmp_path.iterdir() if ".zkllm-" in p.name]
    t.predict(samples(3, (4, 4, 4, 4, 4)))
    ds = zkllm_hf.load_capture(tmp_path / "acts")
    assert [u.metadata["tokens"]["input_ids"] for u in ds] == [s["input_ids"] for s in samples(3, (4,) * 4)]


def test_autocast_is_recorded(tmp_path):
    """bf16 mixed precision on CPU: the forward runs under autocast, and the capture says so and passes."""
    model = make_tiny()
    cb = zkllm_hf.CaptureCallback(tmp_path / "acts", max_samples=2)
    trainer(model, tmp_path, [cb], bf16=True).evaluate()
    ds = zkllm_hf.load_capture(tmp_path / "acts")
    runtime = ds.unit(0).metadata["runtime"]["autocast"]
    assert runtime["enabled"] is True and runtime["dtype"] == "bfloat16"
    dtypes = set(ds.unit(0).manifest.column("source_dtype").to_pylist())
    assert "bfloat16" in dtypes  # the linears ran in bf16
    assert zkllm_hf.validate(tmp_path / "acts", model=model).ok


def test_refusals(tmp_path):
    model = make_tiny()
    cb = zkllm_hf.CaptureCallback(tmp_path / "late", max_samples=1)
    t = trainer(model, tmp_path)
    t.add_callback(cb)  # on_init_end never fires for it
    with pytest.raises(zkllm_hf.CaptureError, match=r"Trainer\(\.\.\., callbacks=\[cb\]\)"):
        t.evaluate()
    with pytest.raises(zkllm_hf.CaptureError, match="DataParallel"):
        zkllm_hf.CaptureCallback(tmp_path / "dp").on_init_end(SimpleNamespace(n_gpu=2), None, None, model=model)
    with pytest.raises(ValueError, match="on='train'"):
        zkllm_hf.CaptureCallback(tmp_path / "x", on="train")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        zkllm_hf.CaptureCallback(tmp_path / "busy")


def test_block_input_file_is_what_zkllm_reads(tmp_path):
    cb = zkllm_hf.CaptureCallback(tmp_path / "acts", max_samples=1, layers="0")
    trainer(make_tiny(), tmp_path, [cb]).evaluate()
    res = cb.result
    assert not res.is_dataset  # one sample: flat, as a single capture
    path = tmp_path / "acts" / POINTS_BY_NAME["block_input"].file_name(0)
    codes = np.fromfile(path, dtype=np.int32).reshape(LENGTHS[0], TINY["hidden_size"])
    assert np.array_equal(codes, np.asarray(zkllm_hf.load_capture(tmp_path / "acts").codes(0, "block_input")))
