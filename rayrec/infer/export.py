"""Export the scoring model (history window → top-K) to TorchScript and ONNX, as a bundle.

A bundle folder is self-contained and loads with ``Recommender.from_checkpoint`` too:

    model.safetensors  config.yaml  state.json  vocab/items.parquet [vocab/users.parquet]
    model.torchscript.pt  model.onnx  export.json (inputs, outputs, k, agreement with eager)

Exported graphs take ``items`` (B, max_len) int64 item indices, left-padded with 0, and
``timestamps`` (B, max_len) int64 (plus ``users`` (B,) for models with a user axis), and return
``scores`` and ``indices`` (B, K): item indices map to raw ids through ``vocab/items.parquet``
(index i ↔ row with item_idx i). Seen-item exclusion in the graph covers the window it is
given; the Python API masks the whole history.
"""
from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from rayrec.config import ConfigError
from rayrec.train import checkpoint as ckpt

log = logging.getLogger("rayrec.infer")
FORMATS = ("torchscript", "onnx")
TORCHSCRIPT, ONNX, MANIFEST = "model.torchscript.pt", "model.onnx", "export.json"


class TopK(nn.Module):
    """``score_last`` → window items masked → top-k: the graph a service runs."""

    def __init__(self, model: nn.Module, k: int, exclude_seen: bool):
        super().__init__()
        self.model, self.k, self.exclude_seen = model.eval(), k, exclude_seen
        self.with_users = model.cfg.user != "none"

    def forward(self, items: torch.Tensor, timestamps: torch.Tensor, users: torch.Tensor | None = None):
        scores = self.model.score_last(items, timestamps, users)  # (B, N+1), padding -inf
        if self.exclude_seen:
            scores = scores.scatter(1, items, float("-inf"))
        return torch.topk(scores, self.k, dim=1)  # (B, K) scores, (B, K) item indices


def example_inputs(rec, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-padded random histories shaped like the real input (used to trace and to compare)."""
    g = torch.Generator().manual_seed(seed)
    T = rec.cfg.model.max_len
    items = torch.randint(1, rec.num_items + 1, (batch, T), generator=g)
    lengths = torch.randint(1, T + 1, (batch,), generator=g)
    items[torch.arange(T)[None, :] < (T - lengths)[:, None]] = 0
    stamps = torch.cumsum(torch.randint(0, 3600, (batch, T), generator=g), dim=1)
    out = (items, stamps)
    if rec.cfg.model.user != "none":
        out += (torch.randint(1, len(rec.user_ids) + 1, (batch,), generator=g),)
    return out


def export_torchscript(wrapper: TopK, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    # tracing records one path through the model; batch size stays free, the window is max_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
    traced.save(str(path))
    return path


def export_onnx(wrapper: TopK, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    if wrapper.model.cfg.attention == "time_interval":
        raise ConfigError("ONNX export of model.attention=time_interval is not supported by torch.onnx "
                          "(aten::cummin has no ONNX translation); export with --format torchscript")
    names = ["items", "timestamps", "users"][: len(inputs)]
    batch = torch.export.Dim("batch")
    dyn = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, inputs, str(path), dynamo=True, input_names=names,
                          output_names=["scores", "indices"], dynamic_shapes=dyn, verbose=False)
    return path


def run_onnx(path: str | Path, inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported model on ONNX Runtime (CPU): the serving path without torch."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # optional dependency
        raise ImportError("running an ONNX export needs onnxruntime: pip install onnxruntime") from e
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    scores, indices = sess.run(["scores", "indices"], feed)
    return scores, indices


def agreement(eager: tuple[torch.Tensor, torch.Tensor], scores: np.ndarray, indices: np.ndarray) -> dict[str, float]:
    e_s, e_i = eager[0].numpy(), eager[1].numpy()
    return {"max_abs_score_diff": float(np.abs(e_s - scores).max()), "top1_agree": float((e_i[:, 0] == indices[:, 0]).mean()),
            "topk_agree": float((e_i == indices).mean())}


def export_bundle(target: str, out_dir: str | Path, formats: list[str] = FORMATS, overrides: list[str] = (),
                  check_batch: int = 16) -> dict:
    """Write a self-contained bundle for ``target`` (run, checkpoint or bundle) and check every export against eager."""
    from rayrec.infer.recommender import Recommender

    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise ConfigError(f"unknown export format(s) {bad}; choose from {list(FORMATS)}")
    rec = Recommender.from_checkpoint(target, overrides)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab").mkdir(exist_ok=True)
    # the weights a bundle serves are the best-on-validation ones, saved as its only weights
    ckpt.save(out, model_state=rec.model.state_dict(), best_state=None, optimizer_state=None,
              state=json.loads((Path(rec.source) / ckpt.STATE).read_text()), config_yaml=rec.cfg.to_yaml())
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(1, rec.num_items + 1, dtype=np.int32)), "item_id": rec.item_ids,
                             "count": pa.array(rec.popularity[1:].astype(np.int64))}), out / "vocab" / "items.parquet")
    if rec.vocab_dir and rec.cfg.model.user != "none":
        shutil.copyfile(Path(rec.vocab_dir) / "users.parquet", out / "vocab" / "users.parquet")
    k = min(rec.cfg.infer.k, rec.num_items)
    wrapper = TopK(rec.model, k, rec.cfg.infer.exclude_seen)
    inputs = example_inputs(rec, batch=2)
    check = example_inputs(rec, batch=check_batch, seed=1)  # a different batch size than traced
    with torch.no_grad():
        eager = wrapper(*check)
    manifest = {"k": k, "exclude_seen_in_window": rec.cfg.infer.exclude_seen, "max_len": rec.cfg.model.max_len,
                "num_items": rec.num_items, "inputs": ["items", "timestamps"] + (["users"] if wrapper.with_users else []),
                "outputs": ["scores", "indices"], "source": rec.source, "files": {}, "agreement": {}}
    if "torchscript" in formats:
        path = export_torchscript(wrapper, inputs, out / TORCHSCRIPT)
        with torch.no_grad():
            s, i = torch.jit.load(str(path))(*check)
        manifest["files"]["torchscript"] = path.name
        manifest["agreement"]["torchscript"] = agreement(eager, s.numpy(), i.numpy())
    if "onnx" in formats:
        path = export_onnx(wrapper, inputs, out / ONNX)
        manifest["files"]["onnx"] = path.name
        try:
            manifest["agreement"]["onnx"] = agreement(eager, *run_onnx(path, check))
        except ImportError as e:
            log.warning("%s: the ONNX file is written but not checked", e)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for fmt, a in manifest["agreement"].items():
        if a["max_abs_score_diff"] > 1e-3:
            raise RuntimeError(f"the {fmt} export disagrees with the eager model: {a}")
    manifest["bundle"] = str(out)
    return manifest
