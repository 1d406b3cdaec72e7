"""``build_model``: look every axis up in its table and pass the parts in."""
from __future__ import annotations

from rayrec.config import ConfigError, ModelConfig
from rayrec.models.attention import ATTENTIONS
from rayrec.models.blocks import BLOCKS as _LAYER_BLOCKS
from rayrec.models.heads import HEADS
from rayrec.models.hstu import hstu_block
from rayrec.models.residual import RESIDUALS
from rayrec.models.seqrec import SeqRec
from rayrec.models.users import USERS

BLOCKS = {**_LAYER_BLOCKS, "hstu": hstu_block}
AXES = {
    "block": BLOCKS,
    "attention": ATTENTIONS,
    "residual": RESIDUALS,
    "user": USERS,
    "head": HEADS,
}


def build_model(cfg: ModelConfig, num_items: int, num_users: int = 0) -> SeqRec:
    for axis, table in AXES.items():
        if getattr(cfg, axis) not in table:
            raise ConfigError(f"model.{axis}={getattr(cfg, axis)!r} is not built; choose one of {sorted(table)}")
    if num_items < 1:
        raise ConfigError(f"the dataset has {num_items} items; need at least one")
    if cfg.user != "none" and num_users < 1:
        raise ConfigError(f"model.user={cfg.user} needs the number of users (got {num_users})")
    attention = ATTENTIONS[cfg.attention]
    blocks = [BLOCKS[cfg.block](cfg, cfg.hidden, attention.layer(cfg, cfg.hidden)) for _ in range(cfg.num_blocks)]
    num_sublayers = sum(len(b.sublayers) for b in blocks)
    return SeqRec(
        cfg, num_items, attention, blocks,
        residual=RESIDUALS[cfg.residual](cfg, cfg.hidden, num_sublayers),
        user=USERS[cfg.user](cfg, cfg.hidden, num_items, num_users),
        head=HEADS[cfg.head](cfg, num_items),
    )
