"""One typed config per run. Defaults live only here; YAML files hold deltas.

``load_config("configs/x.yaml", ["train.lr=0.01", ...])`` returns a validated :class:`Config`.
Unknown keys and bad values fail here, on the driver, with the valid choices in the message.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class ConfigError(ValueError):
    """A config key or value that cannot run; the message names the key and the fix."""


@dataclass
class SourceConfig:
    """A raw dump that jobs/prepare.py turns into ``data.log`` when the log does not exist yet."""

    kind: Literal["none", "synthetic", "movielens", "sasrec_txt", "s3rec_txt", "csv"] = "none"
    path: str = ""  # raw file, .gz, .zip or folder; for movielens also a name to download (e.g. ml-1m)
    user_col: str = "user_id"  # csv: column names in the raw file
    item_col: str = "item_id"
    time_col: str = "timestamp"
    min_rating: float = 0.0  # movielens: keep ratings >= this (0 keeps all)
    users: int = 2000  # synthetic: size and structure of the generated log
    items: int = 500
    mean_len: int = 30
    seed: int = 0


@dataclass
class DataConfig:
    log: str = ""  # interactions.parquet file or folder; local path or pyarrow/fsspec URL
    source: SourceConfig = field(default_factory=SourceConfig)
    cache_dir: str = ""  # where built sequences go; default: _rayrec_cache/ next to the log
    min_user_interactions: int = 0  # users with fewer interactions are dropped (counted)
    min_item_interactions: int = 0  # items with fewer interactions are dropped (counted)
    split: Literal["leave_last_two", "time"] = "leave_last_two"
    time_quantile: float = 0.95  # split=time: events at or after this timestamp quantile are held out
    kcore: bool = False  # iterate the two min_*_interactions filters until both hold at once (k-core)
    max_history: int = 0  # keep each user's most recent events only (before the cut for split=time); 0 = all
    eval_negatives: int = 100  # candidates per user for the sampled protocol, fixed at build time
    num_buckets: int = 0  # user-hash buckets for the sequence build; 0 = from the data size
    seed: int = 0  # seeds the persisted evaluation negatives
    # drop exact duplicate (user, item, timestamp) events, keeping the first (counted): a logging
    # artifact that, as a user's last event, makes the held-out target a repeat of the event before it
    drop_duplicates: bool = True


@dataclass
class ModelConfig:
    block: Literal["sasrec", "ligr", "hstu"] = "sasrec"
    attention: Literal["causal", "bidirectional", "time_interval"] = "causal"
    residual: Literal["plain", "mhc"] = "plain"
    user: Literal["none", "ssept"] = "none"
    head: Literal["bce", "gbce", "sampled_softmax", "ce", "mse", "soft_bce", "masked_diffusion"] = "bce"
    max_len: int = 200
    hidden: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    norm_first: bool = True  # Pre-LN; False = Post-LN as in the original Transformer
    emb_init_std: float = 0.0  # item and position embeddings at init; 0 = by head (models/seqrec.py)
    # bce/gbce/sampled_softmax/soft_bce: sampled negatives per positive (or per batch, shared): a count >= 1,
    # or a share of the catalogue in (0, 1) that follows the data (negatives_for: 0.34 of 12,101 items = 4096)
    num_negatives: float = 1
    neg_sampler: Literal["uniform", "popularity"] = "uniform"  # popularity: ∝ training count, with log-Q correction
    shared_negatives: bool = False  # sampled_softmax: one set of k negatives for the whole batch
    gbce_t: float = 0.75  # gbce calibration: 0 = BCE, 1 = fully calibrated (gSASRec's default 0.75)
    max_rating: float = 5.0  # soft_bce: label = rating / max_rating
    time_span: int = 256  # time_interval: intervals (in units of the user's smallest gap) are clipped here
    hstu_rel_bias: Literal["position_time", "position", "none"] = "position_time"  # hstu: relative attention bias
    # scores: dot product, or cosine (h and item embeddings L2-normalised; training logits / temperature)
    similarity: Literal["dot", "cosine"] = "dot"
    temperature: float = 0.05  # cosine: training logits are cos / temperature (HSTU's ML-1M setting)
    mhc_streams: int = 4  # mhc: residual streams (expansion rate n)
    mhc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations projecting H_res to doubly stochastic
    user_dim: int = 0  # ssept: width of the user embedding (item embeddings get hidden - user_dim)
    sse_user_prob: float = 0.0  # ssept: probability of replacing the user id in training
    sse_item_prob: float = 0.0  # ssept: probability of replacing each input item id in training
    diffusion_eps: float = 1e-3  # masked_diffusion: mask rate t ~ U(eps, 1) per sequence in pre-training
    diffusion_sft_positions: int = 1  # masked_diffusion, train.stage=sft: final positions masked per sequence
    # masked_diffusion pre-training mask: "uniform" = LLaDA's t ~ U(eps, 1) per sequence; "fixed" = every
    # position with probability diffusion_mask_prob (BERT4Rec's masked-item objective); both weight 1/t
    diffusion_schedule: Literal["uniform", "fixed"] = "uniform"
    diffusion_mask_prob: float = 0.2
    diffusion_last_prob: float = 0.0  # pre-training: share of sequences with only the final position(s) masked
    diffusion_last_positions: int = 1  # those sequences mask their final m ~ U{1..this} positions (> 1: next items)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128  # global: split evenly across workers
    lr: float = 1e-3
    weight_decay: float = 0.0  # AdamW decoupled decay
    l2_emb: float = 0.0  # L2 penalty on the item embedding table (SASRec.pytorch's l2_emb)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warm-up; 0 disables
    lr_schedule: Literal["constant", "linear", "cosine", "step"] = "constant"  # after warm-up
    lr_decay_step: int = 1000  # step schedule: multiply by lr_decay_rate every this many steps
    # step schedule in epochs instead (> 0 overrides lr_decay_step): the same config then decays at the
    # same point of training on a log of any size, where a step count is tied to one log's user count
    lr_decay_epochs: float = 0.0
    lr_decay_rate: float = 0.95
    grad_clip: float = 0.0  # max grad norm; 0 disables
    # item-table gradient: dense, sparse (only the rows a step touches are all-reduced and updated:
    # rayrec/train/optim.py), or auto = sparse from sparse_min_items items on where the setup allows
    item_grad: Literal["auto", "dense", "sparse"] = "auto"
    sparse_min_items: int = 50_000
    amp: bool = False  # bf16 autocast, GPU only
    eval_every: int = 1  # epochs between validation passes
    patience: int = 0  # early stopping: validation passes without a gain in eval.metric; 0 disables
    restore_best: bool = True  # test metrics and final weights come from the best-on-validation epoch
    seed: int = 42
    log_every: int = 50  # steps between TensorBoard train scalars
    max_steps_per_epoch: int = 0  # cap (for smoke runs); 0 = every training user once per epoch
    bucket_by_length: bool = False  # batches of similar history length, trimmed: less padding, same objective
    stage: Literal["pretrain", "sft"] = "pretrain"  # masked_diffusion objective: random masks, or final position(s) only
    init_from: str = ""  # run or checkpoint folder whose best weights start this run (fresh optimizer and epochs)
    sft_epochs: int = 0  # > 0: after pre-training, chain an SFT run (<name>_sft) from its best weights
    sft_lr: float = 0.0  # learning rate of the chained SFT run; 0 = train.lr
    sft_lr_schedule: Literal["", "constant", "linear", "cosine", "step"] = ""  # the chained SFT run's; "" = train.lr_schedule
    # share of a batch's users whose training window ends at a uniformly random point of their
    # training history instead of its newest item (random crops: every epoch sees other windows)
    window_crop: float = 0.0


@dataclass
class EvalConfig:
    checkpoint: str = ""  # jobs/evaluate.py: run folder or checkpoint folder to evaluate
    protocol: Literal["full", "sampled", "both"] = "full"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    metric: str = "val_ndcg_10"  # checkpoint selection and early stopping; always a validation metric
    batch_size: int = 256
    exclude_seen: bool = True  # full ranking: a user's history items are never recommended
    # a held-out item already in the user's history (re-purchase, duplicated last event): 'drop' the
    # user from the metric (RecTools/eSASRec leave-one-out protocol), count it as a 'miss' (it is
    # masked with the history), or 'rank' it (the target alone is left unmasked); counted either way
    repeat_targets: Literal["drop", "miss", "rank"] = "drop"
    diffusion_inference: Literal["single", "multi"] = "single"  # masked_diffusion: one mask token, or K unmasked iteratively
    diffusion_k: int = 10  # multi: mask tokens appended = length of the recommended list
    diffusion_threshold: float = 0.9  # multi: accept a position whose confidence reaches this
    diffusion_decay: float = 0.9  # multi: threshold factor applied when no position reaches it
    diffusion_temperature: float = 0.0  # multi: 0 = greedy; > 0 = Gumbel sampling, seeded by diffusion_seed
    diffusion_seed: int = 0
    # full ranking and recommendation score the catalogue in pieces of this many items, so memory is
    # batch x chunk, not batch x items; 0 = as many as fit 64 MiB of scores per batch. Metrics do not
    # depend on it (rayrec/eval/chunked.py)
    chunk_items: int = 0
    # validation and test on a seeded sample of this many evaluable users (0 = all of them): the
    # same users every epoch and on any number of workers; reported as <stage>_users of
    # <stage>_users_sampled_from
    max_users: int = 0
    sample_seed: int = 0


@dataclass
class ScaleConfig:
    num_workers: int = 1  # Ray Train workers; 0 = run the loop in the driver process (no actors)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch threads; 0 = the CPUs Ray gives the worker (at least 1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: int = 1800  # process-group timeout
    max_failures: int = 0  # worker restarts before the run fails
    storage_path: str = ""  # Ray Train storage; default: the run folder's parent


QUANT_METHODS = ("none", "lsq", "pact", "adaround", "apot", "dorefa", "ste")
PER_TENSOR_ONLY = ("pact", "apot", "dorefa")  # one normalisation / clip level per weight tensor in their papers


@dataclass
class QuantConfig:
    """Quantization-aware training (rayrec/quant, docs/quantization.md): fake quantization of the
    weights and input activations of the Linear layers picked by include/exclude."""

    method: Literal["none", "lsq", "pact", "adaround", "apot", "dorefa", "ste"] = "none"
    weight_bits: int = 8
    act_bits: int = 8
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"  # of weight scales (per output row)
    include: list[str] = field(default_factory=lambda: ["blocks.*"])  # fnmatch patterns over Linear module names
    exclude: list[str] = field(default_factory=list)
    embedding: bool = False  # also fake-quantize the item embedding table (input lookup and scoring)
    scoring: bool = False  # also fake-quantize the hidden state entering the scoring matmul (needs embedding)
    start_step: int = 0  # train this many steps in float before fake quantization switches on
    init_from: str = ""  # run or checkpoint folder of a trained float model: QAT fine-tunes its best weights
    pact_l2: float = 1e-4  # pact: L2 penalty on every clip level alpha
    pact_init: float = 0.0  # pact: initial alpha; 0 = max |x| of the first quantized batch (the paper uses 10)
    adaround_reg: float = 0.01  # adaround: weight of the rounding regulariser (mean over weights)
    adaround_beta: tuple[float, float] = (20.0, 2.0)  # adaround: annealing of the regulariser's exponent
    adaround_warmup: float = 0.2  # adaround: fraction of adaround_steps without the regulariser
    adaround_steps: int = 2000  # adaround: steps over which beta anneals (QAT) / iterations per layer (PTQ)
    ste_observer: Literal["minmax", "learned"] = "minmax"  # ste: EMA min/max ranges, or learned scales
    ema: float = 0.9  # ste minmax: momentum of the activation range


@dataclass
class TuneConfig:
    """``jobs/tune.py``: a search over any dotted config key; ignored by jobs/train.py (docs/tune.md)."""

    name: str = ""  # experiment folder under output_dir; default: <name>_tune
    metric: str = ""  # what the search maximises/minimises; default: eval.metric (a val_* metric)
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1  # samples of the space (each grid point is repeated this many times)
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.1  # the trial driver's own request (> 0); its Train workers come from scale.*
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # asha: validation passes before a trial can be stopped
    reduction_factor: float = 2.0  # asha: keep the top 1/reduction_factor at each rung
    search_alg: Literal["auto", "random", "optuna"] = "auto"  # auto: Optuna TPE when installed and no grid
    seed: int = 0  # seeds the search algorithm
    max_failures: int = 0  # retries of a failed trial before it is recorded as errored
    space: dict[str, Any] = field(default_factory=dict)  # "model.hidden": {choice: [32, 64]}, ...


@dataclass
class InferConfig:
    """``rayrec recommend`` / ``rayrec export`` and the defaults of ``rayrec.infer.Recommender``."""

    checkpoint: str = ""  # with a YAML config: run folder, checkpoint folder or exported bundle (path or URL)
    k: int = 10  # recommendations per user
    exclude_seen: bool = True  # never recommend an item of the user's history
    unknown_items: Literal["error", "skip"] = "error"  # history items missing from the vocab
    empty_history: Literal["popular", "error"] = "popular"  # no known item: most-popular fallback, or fail
    output: str = ""  # recommendations.parquet (a Parquet dataset folder), path or URL; default: in the run folder
    batch_size: int = 1024  # users per map_batches call
    num_actors: int = 1  # scoring actors in the pool
    cpus_per_actor: float = 1.0
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: one GPU per actor when the cluster has GPUs


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"  # the run lives in output_dir/name
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).expanduser().absolute() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        d = self.to_dict()
        d["train"]["betas"] = list(d["train"]["betas"])
        d["quant"]["adaround_beta"] = list(d["quant"]["adaround_beta"])
        return yaml.safe_dump(d, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and validation


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if origin is dict:  # free-form mappings (tune.space); their content is checked by their owner
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key.sub=value (e.g. train.lr=0.001)")
        key, raw = o.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {o!r}: the value is not valid YAML ({err.problem}); quote it") from None
        _set_path(out, key.strip(), value)
    return out


def _merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def negatives_for(m: ModelConfig, num_items: int) -> int:
    """Sampled negatives per positive (or per batch) on a catalogue of ``num_items``: ``model.num_negatives``
    itself when it is a count, ``round(share x items)`` (at least 1) when it is a share in (0, 1)."""
    k = m.num_negatives
    return int(k) if k >= 1 else max(1, round(k * num_items))


LOOKUP_HEADS = ("bce", "gbce", "sampled_softmax", "mse", "soft_bce")  # heads that look item rows up


def sparse_item_blockers(cfg: Config) -> list[str]:
    """Why the item table cannot take row-sparse gradients under ``cfg`` ([] when it can)."""
    m, t, s = cfg.model, cfg.train, cfg.scale
    out = []
    if m.head not in LOOKUP_HEADS:
        out.append(f"model.head={m.head} scores the whole catalogue (row-sparse needs one of {', '.join(LOOKUP_HEADS)})")
    if t.l2_emb:
        out.append("train.l2_emb penalises the whole table (set train.l2_emb=0)")
    if cfg.quant.method != "none" and cfg.quant.embedding:
        out.append("quant.embedding fake-quantizes the whole table")
    backend = s.backend if s.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    if s.num_workers > 1 and backend == "nccl":
        out.append("NCCL has no sparse all-reduce for DDP (use scale.backend=gloo, or a dense table)")
    return out


def validate(cfg: Config) -> Config:
    m, t, e, s, d, i = cfg.model, cfg.train, cfg.eval, cfg.scale, cfg.data, cfg.infer
    if t.item_grad == "sparse" and sparse_item_blockers(cfg):
        raise ConfigError("train.item_grad=sparse is not possible here: " + "; ".join(sparse_item_blockers(cfg)))
    checks = [
        (t.sparse_min_items >= 1, f"train.sparse_min_items must be >= 1, got {t.sparse_min_items}"),
        (i.k >= 1 and i.batch_size >= 1 and i.num_actors >= 1, "infer.k, infer.batch_size and infer.num_actors must be >= 1"),
        (i.cpus_per_actor > 0, f"infer.cpus_per_actor must be > 0 (fractions are fine), got {i.cpus_per_actor}"),
        (m.max_len >= 2, "model.max_len must be >= 2"),
        (m.hidden >= 1 and m.num_blocks >= 1 and m.num_heads >= 1, "model.hidden, num_blocks, num_heads must be >= 1"),
        (m.hidden % m.num_heads == 0, f"model.hidden ({m.hidden}) must be divisible by model.num_heads ({m.num_heads})"),
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (m.emb_init_std >= 0, f"model.emb_init_std must be >= 0 (0 = chosen by head), got {m.emb_init_std}"),
        ((m.num_negatives >= 1 and float(m.num_negatives).is_integer()) or 0 < m.num_negatives < 1,
         f"model.num_negatives must be a whole count >= 1 (e.g. 1024) or a share of the catalogue in (0, 1) "
         f"(e.g. 0.34 = a third of the items), got {m.num_negatives}"),
        (0.0 <= m.gbce_t <= 1.0, f"model.gbce_t must be in [0, 1], got {m.gbce_t}"),
        (m.max_rating > 0, "model.max_rating must be > 0"),
        (m.time_span >= 1, "model.time_span must be >= 1"),
        (m.block != "hstu" or m.attention != "time_interval",
         "model.block=hstu attends pointwise with its own relative bias over positions and time "
         "(model.hstu_rel_bias); it has no time_interval form: set model.attention=causal"),
        (m.block != "hstu" or m.head != "masked_diffusion" or m.hstu_rel_bias != "position_time",
         "model.head=masked_diffusion scores from an appended mask token that has no timestamp, so HSTU's time "
         "bias cannot be read there: set model.hstu_rel_bias=position (or none)"),
        (m.temperature > 0, f"model.temperature must be > 0, got {m.temperature}"),
        (m.similarity == "cosine" or m.temperature == ModelConfig.temperature,
         f"model.temperature={m.temperature} only acts with model.similarity=cosine; set that or drop the temperature"),
        (m.similarity == "dot" or m.user == "none",
         "model.similarity=cosine normalises the item part of the hidden state, which SSE-PT's user score offset "
         "would bypass: use model.similarity=dot with model.user=ssept"),
        (m.similarity == "dot" or not cfg.quant.scoring,
         "quant.scoring quantizes the raw item table for INT8 scoring; model.similarity=cosine scores against "
         "the normalised table: set quant.scoring=false (or model.similarity=dot)"),
        (m.mhc_streams >= 1 and m.mhc_sinkhorn_iters >= 1, "model.mhc_streams and mhc_sinkhorn_iters must be >= 1"),
        (0 <= m.user_dim < m.hidden, f"model.user_dim must be in [0, hidden={m.hidden}), got {m.user_dim}"),
        (0.0 <= m.sse_user_prob <= 1.0 and 0.0 <= m.sse_item_prob <= 1.0, "model.sse_*_prob must be in [0, 1]"),
        (m.user == "ssept" or (m.user_dim == 0 and m.sse_user_prob == 0 and m.sse_item_prob == 0),
         "model.user_dim and sse_*_prob only act with model.user=ssept; set model.user=ssept or leave them at 0"),
        (m.attention != "bidirectional" or m.head == "masked_diffusion",
         "model.attention=bidirectional lets every position see its own next item; it is for masked-item "
         "training (DiffSASRec, model.head=masked_diffusion), not for next-item heads: use causal or time_interval"),
        (m.head != "masked_diffusion" or m.attention == "bidirectional",
         f"model.head=masked_diffusion predicts masked items from both sides: set model.attention=bidirectional "
         f"(got {m.attention})"),
        (m.head != "masked_diffusion" or m.sse_item_prob == 0,
         "model.sse_item_prob would replace mask tokens with items; set it to 0 with model.head=masked_diffusion"),
        (0.0 < m.diffusion_eps < 1.0, f"model.diffusion_eps must be in (0, 1), got {m.diffusion_eps}"),
        (0.0 < m.diffusion_mask_prob <= 1.0, f"model.diffusion_mask_prob must be in (0, 1], got {m.diffusion_mask_prob}"),
        (0.0 <= m.diffusion_last_prob <= 1.0, f"model.diffusion_last_prob must be in [0, 1], got {m.diffusion_last_prob}"),
        (1 <= m.diffusion_last_positions < m.max_len,
         f"model.diffusion_last_positions must be in [1, max_len={m.max_len}), got {m.diffusion_last_positions}"),
        (1 <= m.diffusion_sft_positions < m.max_len,
         f"model.diffusion_sft_positions must be in [1, max_len={m.max_len}), got {m.diffusion_sft_positions}"),
        (t.stage == "pretrain" or m.head == "masked_diffusion",
         f"train.stage=sft is the fine-tuning stage of model.head=masked_diffusion; got head={m.head}"),
        (t.sft_epochs >= 0 and t.sft_lr >= 0, "train.sft_epochs and train.sft_lr must be >= 0"),
        (t.sft_epochs == 0 or (m.head == "masked_diffusion" and t.stage == "pretrain"),
         "train.sft_epochs chains SFT after masked_diffusion pre-training: needs model.head=masked_diffusion "
         "and train.stage=pretrain"),
        (e.diffusion_inference == "single" or m.head == "masked_diffusion",
         f"eval.diffusion_inference=multi needs model.head=masked_diffusion, got head={m.head}"),
        (e.diffusion_inference == "single" or e.protocol == "full",
         "eval.diffusion_inference=multi returns a list, not scores: it needs eval.protocol=full"),
        (e.diffusion_inference == "single" or max(e.ks, default=0) <= e.diffusion_k,
         f"eval.diffusion_inference=multi recommends eval.diffusion_k={e.diffusion_k} items; every k in eval.ks "
         f"{e.ks} must be <= it (raise diffusion_k or lower ks)"),
        (e.diffusion_inference == "single" or 1 <= e.diffusion_k < m.max_len, f"eval.diffusion_k must be in [1, max_len={m.max_len}), got {e.diffusion_k}"),
        (0.0 < e.diffusion_threshold <= 1.0 and 0.0 < e.diffusion_decay < 1.0,
         "eval.diffusion_threshold must be in (0, 1] and eval.diffusion_decay in (0, 1)"),
        (e.diffusion_temperature >= 0, "eval.diffusion_temperature must be >= 0"),
        (m.norm_first or (m.residual == "plain" and m.block == "sasrec"),
         f"model.norm_first=false (Post-LN) only exists for block=sasrec with residual=plain; "
         f"block={m.block} / residual={m.residual} are Pre-LN: set model.norm_first=true"),
        (m.neg_sampler == "uniform" or m.head == "sampled_softmax",
         f"model.neg_sampler=popularity needs head=sampled_softmax (the head with the log-Q correction), got head={m.head}"),
        (not m.shared_negatives or m.head == "sampled_softmax",
         f"model.shared_negatives needs head=sampled_softmax, got head={m.head}"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.weight_decay >= 0 and t.l2_emb >= 0, "train.weight_decay and train.l2_emb must be >= 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (0 < t.lr_decay_rate <= 1 and t.lr_decay_step >= 1, "train.lr_decay_rate must be in (0, 1] and lr_decay_step >= 1"),
        (t.lr_decay_epochs >= 0, f"train.lr_decay_epochs must be >= 0 (0 = use lr_decay_step), got {t.lr_decay_epochs}"),
        (not t.lr_decay_epochs or t.lr_schedule == "step",
         f"train.lr_decay_epochs needs train.lr_schedule=step, got lr_schedule={t.lr_schedule}"),
        (t.eval_every >= 1, "train.eval_every must be >= 1"),
        (0.0 <= t.window_crop <= 1.0, f"train.window_crop must be in [0, 1], got {t.window_crop}"),
        (t.patience >= 0 and t.max_steps_per_epoch >= 0, "train.patience and max_steps_per_epoch must be >= 0"),
        (all(0.0 <= b < 1.0 for b in t.betas), "train.betas must be in [0, 1)"),
        (len(e.ks) > 0 and all(k >= 1 for k in e.ks), "eval.ks must be a non-empty list of positive ints"),
        (e.batch_size >= 1, "eval.batch_size must be >= 1"),
        (e.chunk_items >= 0, f"eval.chunk_items must be >= 0 (0 = from a 64 MiB budget per batch), got {e.chunk_items}"),
        (e.max_users >= 0, f"eval.max_users must be >= 0 (0 = every user), got {e.max_users}"),
        (e.metric.startswith("val_"), f"eval.metric must be a validation metric (val_*), got {e.metric!r}: choosing on test leaks"),
        (s.num_workers >= 0, "scale.num_workers must be >= 0"),
        (s.cpus_per_worker > 0, "scale.cpus_per_worker must be > 0"),
        (s.max_failures >= 0 and s.timeout_s >= 1, "scale.max_failures must be >= 0 and timeout_s >= 1"),
        (not (s.backend == "nccl" and not s.use_gpu), "scale.backend=nccl needs scale.use_gpu=true"),
        (d.min_user_interactions >= 0 and d.min_item_interactions >= 0, "data.min_*_interactions must be >= 0"),
        (d.eval_negatives >= 0 and d.num_buckets >= 0, "data.eval_negatives and data.num_buckets must be >= 0"),
        (0.0 < d.time_quantile < 1.0, f"data.time_quantile must be in (0, 1) (e.g. 0.95), got {d.time_quantile}"),
        (d.max_history == 0 or d.max_history >= 3,
         f"data.max_history must be 0 (keep all) or >= 3 (a training pair plus validation and test), got {d.max_history}"),
        (not d.kcore or max(d.min_user_interactions, d.min_item_interactions) > 1,
         "data.kcore=true iterates the min_*_interactions filters: set data.min_user_interactions and/or "
         "data.min_item_interactions above 1 (e.g. 5)"),
        (e.protocol == "full" or d.eval_negatives > 0, "eval.protocol sampled/both needs data.eval_negatives > 0"),
        (bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), f"name must be a plain folder name, got {cfg.name!r}"),
    ]
    checks += _quant_checks(cfg.quant)
    metric_name, _, k = e.metric[4:].rpartition("_")
    checks.append(
        (metric_name in ("ndcg", "hr", "mrr") and k.isdigit() and int(k) in e.ks,
         f"eval.metric {e.metric!r} must be val_<ndcg|hr|mrr>_<k> with k in eval.ks {e.ks}")
    )
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    from rayrec.safety import check_config  # run name charset, URL schemes/queries, absolute local paths

    check_config(cfg)
    if cfg.tune != TuneConfig():  # lazy: rayrec.tune imports this module
        from rayrec.tune.space import validate_tune

        validate_tune(cfg)
    return cfg


def _quant_checks(q: QuantConfig) -> list[tuple[bool, str]]:
    b0, b1 = q.adaround_beta
    return [
        (2 <= q.weight_bits <= 8 and 2 <= q.act_bits <= 8,
         f"quant.weight_bits ({q.weight_bits}) and quant.act_bits ({q.act_bits}) must be in [2, 8]: "
         "the INT8 backend holds at most 8 bits"),
        (q.granularity == "per_tensor" or q.method not in PER_TENSOR_ONLY,
         f"quant.method={q.method} defines one weight normalisation per tensor, so quant.granularity=per_channel "
         "is not defined for it: set quant.granularity=per_tensor (per_channel works with lsq, adaround, ste)"),
        (not q.scoring or q.embedding,
         "quant.scoring quantizes both inputs of the scoring matmul and its item side is the embedding table: "
         "set quant.embedding=true too"),
        (not q.init_from or q.method != "none", "quant.init_from fine-tunes a float model with QAT: set a quant.method"),
        (bool(q.include), "quant.include must name at least one Linear pattern (default: ['blocks.*'])"),
        (q.start_step >= 0 and q.adaround_steps >= 1, "quant.start_step must be >= 0 and quant.adaround_steps >= 1"),
        (q.pact_l2 >= 0 and q.pact_init >= 0 and q.adaround_reg >= 0, "quant.pact_l2, pact_init, adaround_reg must be >= 0"),
        (b0 >= b1 > 0, f"quant.adaround_beta must be [start, end] with start >= end > 0, got {list(q.adaround_beta)}"),
        (0 <= q.adaround_warmup < 1 and 0 < q.ema < 1, "quant.adaround_warmup must be in [0, 1) and quant.ema in (0, 1)"),
    ]


def config_from_dict(raw: dict[str, Any]) -> Config:
    model = raw.get("model")
    if isinstance(model, dict) and "quant" in model:  # the old axis key (checkpoints written before quant:)
        raw = {**raw, "model": {k: v for k, v in model.items() if k != "quant"}}
        if model["quant"] != "none":
            raw["quant"] = {**raw.get("quant", {}), "method": model["quant"]}
    return validate(_build(Config, raw, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a mapping of config sections, got {type(raw).__name__}")
    _merge(raw, parse_overrides(list(overrides)))
    return config_from_dict(raw)
