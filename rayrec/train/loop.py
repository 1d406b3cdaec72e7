"""The one training loop: every rank runs ``train_loop``, under Ray Train, Tune or local mode.

Each rank holds its users (``user_idx % world == rank``) in memory, runs the same number of steps
per epoch as every other rank, and normalises the loss by the global target count so a DDP step
equals a single-process step over the global batch. Rank 0 writes TensorBoard and checkpoints;
every rank calls ``ray.train.report``.
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rayrec.config import Config, config_from_dict, negatives_for
from rayrec.data.batches import SequenceStore, random_ends, sample_negatives, shared_allowed, train_batch
from rayrec.eval.baselines import MostPopular
from rayrec.eval.evaluate import evaluate
from rayrec.models import build_model
from rayrec.quant import init_from_float, prepare, quant_penalty
from rayrec.train import checkpoint as ckpt
from rayrec.train import faults
from rayrec.train.console import EpochClock, epoch_line
from rayrec.train.optim import clip_grad_norm, make_optimizer, use_sparse_items
from rayrec.train.stages import init_weights
from rayrec.train.tb import TBLogger, check_scalars

log = logging.getLogger("rayrec.train")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if _dist():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def peak_rss_gib(device) -> float:
    """This process's peak resident memory, the largest over the ranks (collective when distributed)."""
    import resource

    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, device=device)  # from KiB
    return all_reduce(peak, dist.ReduceOp.MAX if _dist() else None).item()


def lr_factor(step: int, total: int, t, steps_per_epoch: int = 0) -> float:
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    s, span = step - t.warmup_steps, max(1, total - t.warmup_steps)
    if t.lr_schedule == "linear":
        return max(0.0, 1.0 - s / span)
    if t.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / span)))
    if t.lr_schedule == "step":
        every = max(1, round(t.lr_decay_epochs * steps_per_epoch)) if t.lr_decay_epochs else t.lr_decay_step
        return t.lr_decay_rate ** (step // every)
    return 1.0


def train_step(model, optimizer, batch: dict[str, torch.Tensor], cfg: Config, world: int) -> float:
    """One optimiser step; returns the global mean loss. Collective when distributed."""
    core = model.module if hasattr(model, "module") else model
    with torch.autocast(batch["items"].device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and batch["items"].is_cuda):
        loss_sum, count = model(batch)
    bucketed = "norm_count" in batch  # length buckets: the epoch's mean targets per step (EpochBatches.length_buckets)
    stats = [count.float(), loss_sum.detach().float()] + ([batch["norm_count"][0]] if bucketed else [])
    total = all_reduce(torch.stack(stats))
    # DDP averages gradients over ranks, so scale by world / global count to get the global mean
    loss = loss_sum * (world / total[2 if bucketed else 0].clamp(min=1.0))
    if cfg.train.l2_emb:
        loss = loss + cfg.train.l2_emb * core.item_emb.weight.pow(2).sum()
    loss = loss + quant_penalty(core)  # PACT's L2 on clip levels, AdaRound's rounding regulariser
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip:
        clip_grad_norm(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    return (total[1] / total[0].clamp(min=1.0)).item()


def to_device(b: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    # floats (ratings, log q) stay floats; ids and timestamps become int64
    return {k: torch.from_numpy(v).to(device, non_blocking=True) if v.dtype.kind == "f" else
            torch.from_numpy(v).to(device, non_blocking=True).long() for k, v in b.items() if v is not None}


class EpochBatches:
    """Vectorised batches for one epoch on one rank; every rank yields ``steps`` batches.

    Negatives never include an item the user has seen or one of the user's evaluation negatives
    (``forbidden``). With ``neg_sampler=popularity`` they are drawn in proportion to training
    counts and the batch carries ``log_q`` for the head's correction.
    """

    def __init__(self, store: SequenceStore, forbidden: np.ndarray | None, users: np.ndarray, cfg: Config, rank: int,
                 per_rank: int, steps: int, head):
        self.store, self.forbidden, self.users, self.cfg = store, forbidden, users, cfg
        self.rank, self.per_rank, self.steps = rank, per_rank, steps
        self.needs_negatives, self.needs_ratings = head.needs_negatives, head.needs_ratings
        self.k = negatives_for(cfg.model, store.num_items)  # model.num_negatives: a count or a share of the items
        self.norm_by_targets = not hasattr(head, "corrupt")  # masked-item heads normalise per sequence
        if self.needs_ratings and store.ratings is None:
            raise ValueError(f"model.head={cfg.model.head} regresses ratings, but the interaction log has no "
                             "'rating' column; convert a log with ratings (e.g. MovieLens) or pick another head")
        self.probs = self.log_q = None
        if cfg.model.neg_sampler == "popularity":
            counts = np.bincount(store.train_items(), minlength=store.num_items + 1).astype(np.float64)
            counts[0] = 0.0
            counts[1:] += 1.0  # every item stays drawable
            self.probs = counts / counts.sum()
            self.log_q = np.log(np.maximum(self.probs, 1e-30)).astype(np.float32)

    def epoch(self, epoch: int):
        rng = np.random.default_rng([self.cfg.train.seed, epoch, self.rank])
        # ranks with fewer users wrap around so all ranks take the same number of steps (DDP)
        order = np.resize(rng.permutation(self.users), self.steps * self.per_rank)
        m = self.cfg.model
        norm = None
        if self.cfg.train.bucket_by_length:
            order, norm = self.length_buckets(order, epoch, rng)
        for i in range(self.steps):
            rows = order[i * self.per_rank: (i + 1) * self.per_rank]
            end = random_ends(self.store, rows, self.cfg.train.window_crop, rng) if self.cfg.train.window_crop > 0 else None
            b = train_batch(self.store, rows, m.max_len, ratings=self.needs_ratings, trim=norm is not None, end=end)
            if norm is not None and self.norm_by_targets:
                b["norm_count"] = norm
            if self.needs_negatives and m.shared_negatives:
                negs = sample_negatives(rng, None, None, self.store.num_items, (self.k,), probs=self.probs)
                b["shared_negatives"] = negs
                b["shared_allowed"] = shared_allowed(rows, negs, self.forbidden, self.store.num_items)  # (B, k)
            elif self.needs_negatives:
                b["negatives"] = sample_negatives(rng, rows, self.forbidden, self.store.num_items,
                                                  b["targets"].shape + (self.k,), probs=self.probs)
            if self.log_q is not None:
                b["log_q"] = self.log_q
            yield b

    def length_buckets(self, order: np.ndarray, epoch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's users regrouped into batches of similar history length, each trimmed to its
        longest window, so batches carry little padding; and the epoch's mean targets per step.

        A ±10% jitter on the sort key mixes users of near-equal length differently every epoch.
        Every rank takes its length quantiles in one shared step order, so at each step the ranks'
        batches have similar widths and none waits on a much longer one. The loss of a step is
        normalised by the epoch's mean targets per step (``norm_count``), not by the step's own
        count: a short batch then weighs what its targets weigh in a random batch, and the
        epoch's objective is the one of unbucketed training."""
        store, max_len = self.store, self.cfg.model.max_len
        width = np.minimum(store.train_end()[order] - store.offsets[order] - 1, max_len)  # targets per user
        key = width * np.exp(rng.uniform(-0.1, 0.1, len(order)))
        order = order[np.argsort(key, kind="stable")].reshape(self.steps, self.per_rank)
        step_order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(self.steps)
        norm = np.array([width.sum() / self.steps], dtype=np.float32)
        return order[step_order].ravel(), norm


def prefetch(batches, depth: int = 2):
    """Build the next batches on a background thread while the current step computes (numpy
    releases the GIL); an error in the producer is raised in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=produce, name="rayrec-batches", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def startup_breakdown(marks: dict[str, float], first_step_unix: float) -> dict[str, float]:
    """Seconds from the trainer's creation to the first optimizer step, split where it goes: Ray
    starting the controller and worker processes and importing torch (worker), reading this rank's
    shard (data), building the model and taking the step (model). Wall clocks of one host, or of
    NTP-synchronised hosts: the worker span is approximate across machines."""
    return {"startup_worker_s": marks["entered"] - marks["submitted"], "startup_data_s": marks["store"] - marks["entered"],
            "startup_model_s": first_step_unix - marks["store"], "first_step_s": first_step_unix - marks["submitted"]}


def load_store(num_items: int, rank: int, world: int, shard=None, tables=None) -> SequenceStore:
    if tables is None:
        tables = shard.iter_batches(batch_format="pyarrow", batch_size=None)
    return SequenceStore.from_tables(tables, num_items, rank, world)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config``: {"cfg": Config dict, "num_items": N, "num_users": U}."""
    import ray.train

    from rayrec.ray_env import quiet_train_worker

    entered = time.time()
    quiet_train_worker()  # Ray Train's per-report TrainingReport line: RAYREC_VERBOSE=1 only
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.scale.threads_per_worker or max(1, int(cfg.scale.cpus_per_worker)))
    store = load_store(config["num_items"], rank, world, shard=ray.train.get_dataset_shard("sequences"))
    startup = {"submitted": config.get("submitted_unix", entered), "entered": entered, "store": time.time()}
    local = cfg.scale.num_workers == 0
    resume_dir = resume_source(ray.train.get_checkpoint(), cfg)

    def report(metrics, folder=None):
        from ray.train import Checkpoint

        metrics = check_scalars(metrics)
        name = ckpt.dir_name(int(metrics.get("epoch", 0)), final=bool(metrics.get("final")))
        if folder and local:  # local mode does not persist checkpoints: keep them in the run folder
            folder = ckpt.persist(folder, cfg.run_dir, int(metrics.get("epoch", 0)), final=bool(metrics.get("final")))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None,
                         checkpoint_dir_name=name if folder else None)

    progress = faults.Progress(rank, world)
    try:
        run(cfg, store, config["num_users"], rank, world, device, report, resume_dir=resume_dir,
            fault=config.get("fault"), progress=progress, call=config.get("call", ""), startup=startup)
    except RuntimeError as e:
        named = progress.explain(e, cfg.scale.timeout_s)
        if named is None:
            raise
        raise named from e


def resume_source(checkpoint, cfg: Config) -> str | None:
    """The newest checkpoint folder that verifies: Ray's latest, else an earlier one (each skip logged).

    Ray hands back the last *reported* checkpoint; a folder cut short by a killed writer or a lost
    node is never loaded, and with local storage the run's earlier folders are the fallback.
    """
    import pyarrow.fs

    folders: list = []
    if checkpoint is not None:
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            folders = [checkpoint.path] + ckpt.candidates(Path(checkpoint.path).parent)
        else:  # remote storage: only the reported checkpoint is fetched
            folders = [checkpoint.to_directory()]
    # The run folder is empty when a run starts without resume=true (fit refuses otherwise), so what
    # it holds now was written by this run: a restart whose last reports Ray lost with a dead worker
    # or node (RAY_NOTES.md) resumes from the files. Local mode keeps its checkpoints there too.
    folders += ckpt.candidates(cfg.run_dir)
    unique = sorted({str(Path(f).resolve()): Path(f) for f in folders}.values(), key=lambda p: p.name, reverse=True)
    if not unique:
        return None
    return ckpt.require_valid(unique, f"to resume {cfg.name} from ({len(unique)} tried)")


def run(cfg: Config, store: SequenceStore, num_users: int, rank: int, world: int, device, report,
        resume_dir: str | None = None, fault: str | None = None, progress: faults.Progress | None = None,
        call: str = "", startup: dict[str, float] | None = None) -> dict[str, float]:
    """Train, validate, keep the best-on-validation weights, then test them. Returns final metrics.

    Every report is also kept in ``state["history"]``, tagged with ``call`` (one ``fit()`` call):
    it travels in each checkpoint's state.json, so a resumed worker continues it and ``fit()`` reads
    the whole list from the final checkpoint (Ray's ``metrics_dataframe`` keeps only the reports
    of the checkpoints it retains, three of them).

    ``startup`` holds wall-clock marks of this call (trainer built, worker entered, data loaded): the
    first epoch reports where the time before the first step went."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    # quantizers before the checkpoint, DDP and the optimizer: their parameters must exist for all three
    model = prepare(build_model(cfg.model, store.num_items, num_users), cfg).to(device)
    if hasattr(model.head, "stage"):  # masked_diffusion: pre-training or SFT masks
        model.head.stage = cfg.train.stage
    init_weights(model, cfg, resume_dir)
    if cfg.quant.init_from and not resume_dir:
        init_from_float(model, cfg.quant.init_from)
    model.item_emb.sparse = use_sparse_items(cfg, store.num_items)  # row-sparse table: train/optim.py
    optimizer = make_optimizer(model, cfg)
    state = {"epoch": 0, "global_step": 0, "best_metric": -math.inf, "best_epoch": -1, "bad_evals": 0, "history": []}
    best_state = None
    if resume_dir:
        ckpt.verify(resume_dir)
        model.load_state_dict(ckpt.load_weights(resume_dir, verified=True))
        best_state = ckpt.load_weights(resume_dir, best=True, verified=True)
        opt = ckpt.load_optimizer(resume_dir)
        if opt:
            optimizer.load_state_dict(opt["optimizer"])
        state.update(ckpt.load_state(resume_dir))
        state["resumed_at_epochs"] = [*state.get("resumed_at_epochs", []), state["epoch"]]  # audit trail
        log.info("rank %d resumed from %s at epoch %d", rank, resume_dir, state["epoch"])
    if any(h.get("call") == call for h in state["history"]):
        startup = None  # a restarted worker group of this call: its wait since the trainer's creation is not start-up
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    per_rank = max(1, cfg.train.batch_size // world)
    users = store.train_users()
    steps = math.ceil(all_reduce(torch.tensor(float(len(users))), dist.ReduceOp.MAX if _dist() else None).item() / per_rank)
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    total_steps = steps * cfg.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg.train, steps))
    if resume_dir and opt and opt.get("scheduler"):
        scheduler.load_state_dict(opt["scheduler"])
        # LambdaLR's constructor set each group's lr to factor(0); load_state_dict restores the step
        # count but not the lr, so the first step after a resume would run at the warm-up lr
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    batches = EpochBatches(store, store.forbidden_keys() if model.head.needs_negatives else None, users, cfg, rank,
                           per_rank, steps, model.head)
    tb = TBLogger(cfg.run_dir / "tensorboard" if rank == 0 else None, state["global_step"])
    metric = cfg.eval.metric
    last_val: dict[str, float] = {}
    clock = EpochClock(state["epoch"], cfg.train.epochs)
    try:
        for epoch in range(state["epoch"], cfg.train.epochs):
            torch.manual_seed(cfg.train.seed * 1_000_003 + epoch * 101 + rank)  # dropout: resumable, per rank
            ddp.train()
            t0, loss_sum, n_steps = time.perf_counter(), 0.0, 0
            first_step_unix = None
            faults.maybe_inject(fault, rank, epoch + 1, cfg.run_dir)  # test-only (RAYREC_FAULT); no-op otherwise
            for b in prefetch(batches.epoch(epoch)):
                if progress is not None:
                    progress.mark(epoch, n_steps)
                loss = train_step(ddp, optimizer, to_device(b, device), cfg, world)
                scheduler.step()
                if first_step_unix is None:
                    first_step_unix = time.time()  # wall clock: comparable with the driver's (bench/train_speed.py)
                state["global_step"] += 1
                loss_sum, n_steps = loss_sum + loss, n_steps + 1
                if state["global_step"] % cfg.train.log_every == 0:
                    tb.scalars({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, state["global_step"])
            dt = time.perf_counter() - t0
            metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_steps),
                       "seq_per_s": n_steps * per_rank * world / dt, "epoch_s": dt, "lr": scheduler.get_last_lr()[0],
                       "first_step_unix": first_step_unix or math.nan, "peak_rss_gib": peak_rss_gib(device)}
            if startup is not None and first_step_unix is not None:
                metrics.update(startup_breakdown(startup, first_step_unix))
                startup = None  # once per call
            state["epoch"] = epoch + 1
            done = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.train.eval_every == 0 or done:
                last_val = evaluate(model, store, cfg.eval, cfg.model.max_len, "val", device)
                metrics.update(last_val)
                if last_val[metric] > state["best_metric"]:
                    state.update(best_metric=last_val[metric], best_epoch=epoch + 1, bad_evals=0)
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    state["bad_evals"] += 1
                if cfg.train.patience and state["bad_evals"] >= cfg.train.patience:
                    done = True
                    log.info("early stop at epoch %d: no %s gain for %d evaluations", epoch + 1, metric, cfg.train.patience)
            tb.scalars({k: v for k, v in metrics.items() if k not in ("epoch", "first_step_unix")}, state["global_step"], prefix="epoch/")
            if rank == 0:
                log.info(epoch_line(metrics, cfg.train.epochs, metric, 0.0 if done else clock.eta_s(epoch + 1)))
            tb.flush()
            state["history"].append({**metrics, "call": call})  # (a resumed older checkpoint keeps the [] above)
            _report_with_checkpoint(report, rank, metrics, model.state_dict(), best_state, optimizer, scheduler, state, cfg)
            if done:
                break
        # test only the best-on-validation weights; the checkpoint keeps the last weights for resuming
        last_state = copy.deepcopy(model.state_dict())
        if cfg.train.restore_best and best_state is not None:
            model.load_state_dict(best_state)
        final = {f"best_{metric}": state["best_metric"], "best_epoch": state["best_epoch"]}
        final.update({k: v for k, v in evaluate(model, store, cfg.eval, cfg.model.max_len, "val", device).items()})
        final.update(evaluate(model, store, cfg.eval, cfg.model.max_len, "test", device))
        # the bar every model must clear, scored by the same evaluation path
        pop = evaluate(MostPopular(store).to(device), store, cfg.eval, cfg.model.max_len, "test", device)
        final.update({"baseline_pop_" + k: v for k, v in pop.items() if k.startswith(("test_ndcg", "test_hr", "test_mrr"))})
        final.update({"epoch": state["epoch"], "final": 1, "train_s": time.perf_counter() - t_start,
                      "sparse_item_table": float(model.item_emb.sparse)})
        tb.scalars({k: v for k, v in final.items() if k.startswith("test_")}, state["global_step"], prefix="final/")
        hp = {"model.head": cfg.model.head, "model.hidden": cfg.model.hidden, "model.num_blocks": cfg.model.num_blocks,
              "model.max_len": cfg.model.max_len, "train.lr": cfg.train.lr, "train.batch_size": cfg.train.batch_size,
              "model.dropout": cfg.model.dropout, "model.norm_first": cfg.model.norm_first}
        tb.hparams(hp, {k: v for k, v in final.items() if k.startswith(("test_", "val_ndcg", "val_hr"))}, state["global_step"])
        state["history"].append({**final, "call": call})
        _report_with_checkpoint(report, rank, final, last_state, best_state or last_state, optimizer, scheduler, state, cfg)
        return final
    finally:
        tb.close()


def _report_with_checkpoint(report, rank, metrics, model_state, best_state, optimizer, scheduler, state, cfg) -> None:
    if rank != 0:
        report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
        ckpt.save(tmp, model_state=model_state, best_state=best_state, optimizer_state=optimizer.state_dict(),
                  scheduler_state=scheduler.state_dict(), state=dict(state), config_yaml=cfg.to_yaml())
        report(metrics, tmp)
