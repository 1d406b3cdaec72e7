"""The model ``jobs/evaluate.py`` scores: float, fake-quantized, AdaRound-rounded after training, or INT8."""
from __future__ import annotations

import numpy as np
import torch

from rayrec.config import Config, ConfigError
from rayrec.quant.convert import convert
from rayrec.quant.prepare import load_float_weights, prepare
from rayrec.quant.ptq import adaround_ptq

CALIBRATION_USERS = 512


def calibration_batches(store, cfg: Config, users: int = CALIBRATION_USERS, batch: int = 128) -> list[dict]:
    """Training windows of a fixed sample of users (never validation or test items)."""
    from rayrec.data.batches import train_batch

    pool = store.train_users()
    rows = np.random.default_rng(cfg.train.seed).permutation(pool)[:users]
    return [{k: torch.from_numpy(v).long() for k, v in train_batch(store, rows[i: i + batch], cfg.model.max_len).items()
             if k in ("items", "timestamps", "user_idx")} for i in range(0, len(rows), batch)]


def quantized_model(model, cfg: Config, saved: Config, weights: dict, store, int8: bool):
    """``model`` (built from ``cfg``) with ``weights`` loaded, quantized as ``cfg.quant`` says.

    A QAT checkpoint (saved with a quant.method) loads into the prepared model as it was trained.
    A float checkpoint evaluated with ``quant.method=adaround`` gets AdaRound's post-training pass
    on calibration windows first. ``int8`` converts the result to the real INT8 model."""
    if saved.quant.method not in ("none", cfg.quant.method):
        raise ConfigError(f"the checkpoint was trained with quant.method={saved.quant.method}; evaluate it with "
                          f"that method (got quant.method={cfg.quant.method})")
    prepare(model, cfg)
    if saved.quant.method == cfg.quant.method:
        model.load_state_dict(weights)
    elif cfg.quant.method == "adaround":
        load_float_weights(model, weights)
        adaround_ptq(model, calibration_batches(store, cfg))
    else:
        raise ConfigError(f"a float checkpoint can be quantized after training only with quant.method=adaround "
                          f"(got {cfg.quant.method}); the other methods need quantization-aware training")
    if int8:
        if cfg.quant.method == "none":
            raise ConfigError("--int8 needs a quantized model: evaluate a QAT checkpoint, or add quant.method=adaround "
                              "to round a float checkpoint after training")
        return convert(model)
    return model
