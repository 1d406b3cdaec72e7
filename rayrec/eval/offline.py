"""Evaluate a saved checkpoint outside training (jobs/evaluate.py, ``rayrec evaluate``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rayrec.config import Config, ConfigError, load_config
from rayrec.train import checkpoint as ckpt


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete one in a run folder."""
    p = Path(path).expanduser()
    if (p / ckpt.STATE).exists():
        return p
    found = ckpt.candidates(p)
    if found:  # a run folder: its newest checkpoint that verifies, or why none does
        return Path(ckpt.require_valid(found, f"in {p}"))
    if not p.exists():
        near = sorted(q.name for q in p.parent.glob(p.name + "*") if q.is_dir())[-3:] if p.parent.is_dir() else []
        hint = f"; did you mean {', '.join(str(p.parent / n) for n in near)}?" if near else \
            "; give the run folder a training wrote (its path is printed at the end of the run)"
        raise ConfigError(f"{p} does not exist{hint}")
    raise ConfigError(f"{p} is neither a checkpoint folder (with {ckpt.STATE}) nor a run folder holding one")


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), int8: bool = False) -> tuple[dict[str, float], Config]:
    from rayrec.ray_env import init_ray, progress_bars_on_a_terminal

    folder = find_checkpoint(path)
    weights = ckpt.load_weights(folder, best=True)  # a refused checkpoint fails here, before Ray starts
    cfg = load_config(folder / ckpt.CONFIG, overrides)
    init_ray()  # sets the quiet environment Ray Data reads when it is first imported, just below
    import ray.data

    from rayrec.data.sequences import build_sequences
    from rayrec.eval.evaluate import evaluate
    from rayrec.models import build_model
    from rayrec.train.loop import load_store

    progress_bars_on_a_terminal()
    data = build_sequences(cfg.data)
    tables = ray.data.read_parquet(data.sequences_path).iter_batches(batch_format="pyarrow", batch_size=None)
    store = load_store(data.num_items, 0, 1, tables=tables)
    # the best-on-validation weights: selection never looks at test
    from rayrec.quant.offline import quantized_model

    model = quantized_model(build_model(cfg.model, data.num_items, data.num_users), cfg,
                            load_config(folder / ckpt.CONFIG), weights, store, int8)
    torch.set_num_threads(max(1, cfg.scale.threads_per_worker or torch.get_num_threads()))
    metrics = {"checkpoint": str(folder), "protocol": cfg.eval.protocol, "quant": cfg.quant.method, "int8": int8}
    for stage in ("val", "test"):
        metrics.update(evaluate(model, store, cfg.eval, cfg.model.max_len, stage, torch.device("cpu")))
    out = folder.parent / f"evaluation_{cfg.eval.protocol}{'_int8' if int8 else ''}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, cfg
