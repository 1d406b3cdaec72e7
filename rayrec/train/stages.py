"""Training stages: start from another run's weights (``train.init_from``) and chain masked-diffusion
pre-training into supervised fine-tuning (``train.sft_epochs``).

A stage is an ordinary run with its own folder, epochs, learning rate, optimizer and checkpoints;
only the weights carry over (safetensors, the best-on-validation ones), so SFT's model selection
is again on validation only.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import yaml

from rayrec.config import Config, ConfigError, config_from_dict
from rayrec.train import checkpoint as ckpt

log = logging.getLogger("rayrec.train")
# model settings that may differ between stages: they change no weight's shape or meaning
FREE_MODEL_KEYS = {"dropout", "diffusion_eps", "diffusion_sft_positions", "diffusion_schedule", "diffusion_mask_prob",
                   "diffusion_last_prob", "diffusion_last_positions"}


def check_init_from(cfg: Config) -> None:
    """On the driver, before any worker starts: the folder holds a checkpoint of the same model."""
    if not cfg.train.init_from:
        return
    from rayrec.eval.offline import find_checkpoint

    try:
        folder = find_checkpoint(cfg.train.init_from)
    except ConfigError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    theirs = (yaml.safe_load((folder / ckpt.CONFIG).read_text()) or {}).get("model", {})
    ours = dataclasses.asdict(cfg.model)
    differ = sorted(k for k in ours if k not in FREE_MODEL_KEYS and k in theirs and theirs[k] != ours[k])
    if differ:
        raise ConfigError(f"train.init_from={folder} was trained with a different model: "
                          + ", ".join(f"model.{k}={theirs[k]!r} there, {ours[k]!r} here" for k in differ)
                          + "; use the same model settings")


def init_weights(model, cfg: Config, resume_dir: str | None) -> None:
    """Load ``train.init_from``'s best weights into a fresh run (a resumed run has its own)."""
    if not cfg.train.init_from or resume_dir:
        return
    from rayrec.eval.offline import find_checkpoint

    folder = find_checkpoint(cfg.train.init_from)
    model.load_state_dict(ckpt.load_weights(folder, best=True))
    log.info("initialised from the best weights of %s", folder)


def sft_config(cfg: Config, pretrained: str | Path) -> Config:
    """The SFT stage chained after ``cfg``'s pre-training: its own run folder, epochs and lr."""
    d = cfg.to_dict()
    d["name"] = f"{cfg.name}_sft"
    d["train"].update(stage="sft", init_from=str(Path(pretrained).absolute()), epochs=cfg.train.sft_epochs,
                      lr=cfg.train.sft_lr or cfg.train.lr, lr_schedule=cfg.train.sft_lr_schedule or cfg.train.lr_schedule,
                      sft_epochs=0, sft_lr=0.0, sft_lr_schedule="")
    return config_from_dict(d)


def chain_sft(cfg: Config, pre):
    """Run the SFT stage after the pre-training result ``pre``; its metrics keep the pre-training
    ones under ``pretrain_*``."""
    from rayrec.train.fit import fit

    if not pre.checkpoint:
        raise ConfigError(f"pre-training run {cfg.name} left no checkpoint to fine-tune from")
    res = fit(sft_config(cfg, pre.checkpoint))
    res.metrics.update({f"pretrain_{k}": v for k, v in pre.metrics.items()
                        if isinstance(v, (int, float)) and k.startswith(("val_", "test_", "best_"))})
    res.metrics["pretrain_run_dir"] = str(pre.run_dir)
    return res
