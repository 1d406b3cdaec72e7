"""``Recommender``: a trained checkpoint that takes raw item ids in and gives raw item ids out.

    rec = Recommender.from_checkpoint("runs/quickstart")          # run, checkpoint or bundle; path or URL
    rec.recommend([["i12", "i7", "i93"]], k=10)                   # DataFrame user_id, rank, item_id, score
    rec.score({"u1": ["i12", "i7"]}, candidates=["i3", "i4"])     # DataFrame user_id, item_id, score

Histories are encoded into the same CSR store the evaluation reads, windowed by ``eval_batch`` and
scored through ``rayrec.eval.chunked`` (top-k over catalogue pieces) as evaluation is: one scoring
path, so what evaluation ranks first for a user is what this class recommends.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rayrec.config import Config, ConfigError, load_config
from rayrec.data.batches import SequenceStore, eval_batch
from rayrec.data.log import DataError, resolve
from rayrec.eval.chunked import ItemScores, SeenMask, chunk_size, top_items, topk_stable
from rayrec.train import checkpoint as ckpt

log = logging.getLogger("rayrec.infer")
VOCAB = "vocab"
SHOW = 20  # ids named in an error message


class UnknownItemsError(DataError):
    """History or candidate item ids that are not in the model's vocabulary."""

    def __init__(self, msg: str, items: list):
        super().__init__(msg)
        self.items = items


def _local_folder(path_or_url: str | Path) -> Path:
    """A local folder for a checkpoint given as a path or a pyarrow/fsspec URL (copied once to a temp dir)."""
    s = str(path_or_url)
    if "://" not in s or s.startswith("file://"):
        return Path(s.removeprefix("file://")).expanduser()
    import pyarrow.fs as pafs

    fs, path = resolve(s)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ConfigError(f"checkpoint {s} does not exist")
    dest = Path(tempfile.mkdtemp(prefix="rayrec-ckpt-"))
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def find_checkpoint(path: Path) -> Path:
    """A checkpoint (or exported bundle) folder itself, or the newest complete one in a run folder."""
    from rayrec.eval.offline import find_checkpoint as find

    return find(path)


def data_root(folder: Path, cfg: Config) -> str | None:
    """The sequence build the checkpoint was trained on (``data_meta.json`` of its run folder)."""
    for meta in (folder.parent / "data_meta.json", cfg.run_dir / "data_meta.json"):
        if meta.exists():
            return json.loads(meta.read_text())["root"]
    return None


def _vocab_dir(folder: Path, root: str | None) -> str:
    if (folder / VOCAB / "items.parquet").exists():  # an exported bundle carries its vocab
        return str(folder / VOCAB)
    if root is not None:
        return f"{root.rstrip('/')}/{VOCAB}"
    raise ConfigError(
        f"no vocabulary found for {folder}: it is neither a bundle (with {VOCAB}/items.parquet) nor inside a run "
        "folder with data_meta.json; pass vocab=<sequence build>/vocab, or export a bundle with `rayrec export`"
    )


def _read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


class Recommender:
    """A model with its config and vocabularies; raw ids in, raw ids out."""

    def __init__(self, model: torch.nn.Module, cfg: Config, item_ids: pa.Array, item_counts: np.ndarray,
                 user_ids: pa.Array | None = None, *, source: str = "", data_root: str | None = None,
                 vocab_dir: str | None = None):
        self.model, self.cfg = model.eval(), cfg
        self.num_items = len(item_ids)
        if model.num_items != self.num_items:
            raise ConfigError(f"the vocabulary has {self.num_items} items but the model was trained on {model.num_items}; "
                              "the vocab does not belong to this checkpoint")
        self.item_ids = item_ids  # item_idx i+1 -> item_ids[i]
        self.popularity = np.r_[-np.inf, item_counts.astype(np.float64)]  # (N+1,) empty-history fallback
        self.user_ids = user_ids  # only models with a user axis need it
        self.source, self.data_root, self.vocab_dir = source, data_root, vocab_dir
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_checkpoint(cls, path_or_url: str | Path, overrides: Iterable[str] = (), *, vocab: str | None = None,
                        best: bool = True, device: str = "cpu") -> "Recommender":
        """Load a run folder, a checkpoint folder or an exported bundle (local path or URL).

        ``overrides`` (``infer.k=20`` ...) apply on top of the checkpoint's own config; ``best``
        loads the best-on-validation weights; ``vocab`` points at a ``vocab/`` folder when the
        checkpoint was moved away from its run folder and is not a bundle.
        """
        from rayrec.models import build_model

        folder = find_checkpoint(_local_folder(path_or_url))
        cfg = load_config(folder / ckpt.CONFIG, list(overrides))
        root = data_root(folder, cfg)
        vdir = vocab or _vocab_dir(folder, root)
        items = _read_parquet(f"{vdir}/items.parquet").sort_by("item_idx")
        users = None
        if cfg.model.user != "none":
            users = _read_parquet(f"{vdir}/users.parquet").sort_by("user_idx")["user_id"].combine_chunks()
        model = build_model(cfg.model, items.num_rows, 0 if users is None else len(users))
        model.load_state_dict(ckpt.load_weights(folder, best=best))
        rec = cls(model, cfg, items["item_id"].combine_chunks(), items["count"].to_numpy(), users,
                  source=str(folder), data_root=root, vocab_dir=vdir)
        return rec.to(device)

    def to(self, device: str | torch.device) -> "Recommender":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------
    # raw ids <-> indices

    def _index(self, raw: pa.Array, vocab: pa.Array, what: str) -> np.ndarray:
        """Raw ids -> 1-based indices, 0 where unknown."""
        if len(raw) == 0:
            return np.zeros(0, dtype=np.int64)
        if raw.type != vocab.type:
            try:
                raw = raw.cast(vocab.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise DataError(f"{what} ids of type {raw.type} cannot be read as the vocabulary's {vocab.type} "
                                f"(e.g. {raw[0].as_py()!r}); pass ids of the type used in training") from None
        idx = pc.index_in(raw, value_set=vocab)
        return pc.fill_null(pc.add(idx, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)

    def item_index(self, raw) -> np.ndarray:
        return self._index(pa.array(raw) if not isinstance(raw, (pa.Array, pa.ChunkedArray)) else raw, self.item_ids, "item")

    def item_id(self, idx: np.ndarray) -> pa.Array:
        return self.item_ids.take(pa.array(np.asarray(idx, dtype=np.int64) - 1))

    # ------------------------------------------------------------------------------------------
    # histories -> store

    def encode(self, histories, unknown_items: str | None = None) -> tuple[pa.Array, SequenceStore]:
        """Histories in any accepted form -> (user keys, SequenceStore of known items, time order kept).

        Accepted: one list of item ids; a list of lists (keys 0..n-1); a dict user -> list;
        a pandas DataFrame or pyarrow Table with user_id, item_id and optionally timestamp
        (sorted per user by time, ties in row order, like the sequence build).
        """
        policy = unknown_items or self.cfg.infer.unknown_items
        keys, offsets, raw, stamps = _flatten(histories)
        if stamps is None:
            if self.cfg.model.attention == "time_interval":
                raise DataError("model.attention=time_interval needs timestamps: pass a table with user_id, item_id, timestamp")
            # positions stand in for time: only time-aware attention reads them
            stamps = np.arange(len(raw), dtype=np.int64)
        idx = self.item_index(raw)
        unknown = idx == 0
        if unknown.any():
            bad = pc.unique(raw.filter(pa.array(unknown))).to_pylist()
            if policy == "error":
                raise UnknownItemsError(
                    f"{len(bad)} item id(s) are not in the model's vocabulary: {bad[:SHOW]}{' ...' if len(bad) > SHOW else ''}; "
                    "drop them, or pass unknown_items='skip' (infer.unknown_items=skip) to ignore them", bad)
            log.info("skipping %d unknown item id(s), e.g. %s", len(bad), bad[:5])
            rows = np.repeat(np.arange(len(keys)), np.diff(offsets))
            keep = ~unknown
            offsets = np.r_[0, np.cumsum(np.bincount(rows[keep], minlength=len(keys)))]
            idx, stamps = idx[keep], stamps[keep]
        user_idx = np.zeros(len(keys), dtype=np.int64)
        if self.user_ids is not None:
            user_idx = self._index(keys, self.user_ids, "user")
            if (user_idx == 0).any():
                missing = keys.filter(pa.array(user_idx == 0)).to_pylist()
                raise DataError(f"model.user={self.cfg.model.user} scores known users only; unknown user id(s) "
                                f"{missing[:SHOW]}: pass histories keyed by training user ids")
        store = SequenceStore(user_idx=user_idx, offsets=offsets.astype(np.int64), items=idx.astype(np.int32),
                              timestamps=stamps.astype(np.int64), eval_negatives=None, num_items=self.num_items)
        return keys, store

    # ------------------------------------------------------------------------------------------
    # scoring

    @torch.no_grad()
    def _scores_at(self, store: SequenceStore, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The scores of items ``cols`` (len(rows), M) after each whole history, nothing masked:
        read from the catalogue's scoring tiles, so they are the floats ``top_k`` ranks by."""
        bs, out = self.cfg.eval.batch_size, []
        for lo in range(0, len(rows), bs):
            b = eval_batch(store, rows[lo: lo + bs], self.cfg.model.max_len, "next", trim=True)
            picked, _ = ItemScores.of(self.model, b, self.device).scan(torch.from_numpy(cols[lo: lo + bs]).to(self.device))
            out.append(picked.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, cols.shape[1]))

    @torch.no_grad()
    def _top(self, store: SequenceStore, rows: np.ndarray, k: int, exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best items after each whole history, (len(rows), k) scores and item indices, ties to
        the lower item: the catalogue a piece at a time (``eval.chunk_items``), never (B, N+1)."""
        bs, values, items = self.cfg.eval.batch_size, [], []
        for lo in range(0, len(rows), bs):
            b = eval_batch(store, rows[lo: lo + bs], self.cfg.model.max_len, "next", trim=True)
            seen = SeenMask.of(b, self.device) if exclude_seen else None
            v, i = top_items(ItemScores.of(self.model, b, self.device), seen, k,
                             chunk_size(self.cfg.eval.chunk_items, len(b["user_idx"])))
            values.append(v.cpu())
            items.append(i.cpu())
        return torch.cat(values), torch.cat(items)

    def _empty_rows(self, keys: pa.Array, store: SequenceStore, policy: str) -> np.ndarray:
        empty = store.lengths == 0
        if empty.any() and policy == "error":
            raise DataError(f"{int(empty.sum())} user(s) have no known history item (e.g. {keys.filter(pa.array(empty)).to_pylist()[:SHOW]}); "
                            "pass empty_history='popular' (infer.empty_history=popular) for a most-popular fallback")
        return empty

    def top_k(self, keys: pa.Array, store: SequenceStore, k: int, exclude_seen: bool, empty_history: str | None = None) -> pa.Table:
        """Long-form recommendations for every user of a store: user_id, rank (1..k), item_id, score.

        A user gets fewer than k rows only when excluding the history leaves fewer than k items.
        Equal scores rank the lower item index first, whatever ``eval.chunk_items`` is.
        """
        empty = self._empty_rows(keys, store, empty_history or self.cfg.infer.empty_history)
        n, k = len(keys), min(k, self.num_items)
        scores = torch.full((n, k), -np.inf, dtype=torch.float32)
        index = torch.zeros((n, k), dtype=torch.int64)
        model_rows = np.flatnonzero(~empty)
        if len(model_rows):
            scores[model_rows], index[model_rows] = self._top(store, model_rows, k, exclude_seen)
        if empty.any():
            pop_scores, pop_items = topk_stable(torch.from_numpy(self.popularity).float()[None], k)
            scores[torch.from_numpy(empty)], index[torch.from_numpy(empty)] = pop_scores, pop_items
        keep = torch.isfinite(scores).numpy()  # -inf: excluded (seen) items when the catalogue runs out
        rows = np.repeat(np.arange(n), k).reshape(n, k)[keep]
        ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), (n, 1))[keep]
        return pa.table({
            "user_id": keys.take(pa.array(rows, pa.int64())),
            "rank": pa.array(ranks, pa.int32()),
            "item_id": self.item_id(index.numpy()[keep]),
            "score": pa.array(scores.numpy()[keep], pa.float32()),
        })

    def recommend(self, histories, k: int | None = None, exclude_seen: bool | None = None,
                  unknown_items: str | None = None, empty_history: str | None = None):
        """Top-``k`` raw item ids per user, as a pandas DataFrame (user_id, rank, item_id, score).

        Defaults come from the checkpoint's ``infer`` config (k=10, exclude_seen, unknown_items=error,
        empty_history=popular).
        """
        i = self.cfg.infer
        k = i.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"k must be a positive integer (the length of each list), got {k!r}")
        keys, store = self.encode(histories, unknown_items)
        return self.top_k(keys, store, int(k), i.exclude_seen if exclude_seen is None else exclude_seen,
                          empty_history).to_pandas()

    def recommend_sequences(self, batch: pa.Table, k: int, exclude_seen: bool) -> pa.Table:
        """Recommendations for a batch of the sequences dataset (already encoded; batch inference)."""
        batch = batch.sort_by("user_idx")  # the store sorts by user_idx: keep the raw ids aligned
        store = SequenceStore.from_tables([batch.select(["user_idx", "items", "timestamps"])], self.num_items)
        return self.top_k(batch["user_id"].combine_chunks(), store, k, exclude_seen, "error")

    def score(self, histories, candidates, unknown_items: str | None = None, empty_history: str | None = None):
        """Scores of ``candidates`` (one list for every user, or one list per user) after each history.

        Returns a pandas DataFrame (user_id, item_id, score), candidates in the order given. Seen
        items are not masked: you asked for them. An unknown candidate is an error, or gets a NaN
        score with unknown_items='skip'. Empty histories score by item popularity (counts).
        """
        policy = unknown_items or self.cfg.infer.unknown_items
        keys, store = self.encode(histories, unknown_items)
        n = len(keys)
        if len(candidates) and not isinstance(candidates[0], (list, tuple, np.ndarray, pa.Array)):
            cand_raw = [list(candidates)] * n
        else:
            cand_raw = [list(c) for c in candidates]
            if len(cand_raw) != n:
                raise DataError(f"got {len(cand_raw)} candidate lists for {n} users; pass one list, or one per user")
        flat = item_array([c for cs in cand_raw for c in cs])
        cidx = self.item_index(flat)
        if (cidx == 0).any() and policy == "error":
            bad = pc.unique(flat.filter(pa.array(cidx == 0))).to_pylist()
            raise UnknownItemsError(f"candidate id(s) not in the vocabulary: {bad[:SHOW]}; "
                                    "pass unknown_items='skip' to score them NaN", bad)
        empty = self._empty_rows(keys, store, empty_history or self.cfg.infer.empty_history)
        lens = np.array([len(c) for c in cand_raw], dtype=np.int64)
        rows = np.repeat(np.arange(n), lens)
        pos = np.arange(len(rows)) - np.repeat(np.r_[0, np.cumsum(lens)[:-1]], lens)
        cols = np.zeros((n, int(lens.max(initial=0))), dtype=np.int64)  # (users, longest list), 0 = padding
        cols[rows, pos] = cidx
        table = np.empty(cols.shape, dtype=np.float64)  # never (users, N+1)
        table[~empty] = self._scores_at(store, np.flatnonzero(~empty), cols[~empty])
        table[empty] = self.popularity[cols[empty]]
        out = table[rows, pos]
        out[cidx == 0] = np.nan
        return pa.table({"user_id": keys.take(pa.array(rows)), "item_id": flat,
                         "score": pa.array(out, pa.float64())}).to_pandas()


def _is_seq(x: Any) -> bool:
    return isinstance(x, (list, tuple, np.ndarray, pa.Array, pa.ChunkedArray))


def _flatten(histories) -> tuple[pa.Array, np.ndarray, pa.Array, np.ndarray | None]:
    """Any accepted history form -> (user keys, CSR offsets, raw item ids, timestamps or None)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas ships with Ray Data
        pd = None
    if pd is not None and isinstance(histories, pd.DataFrame):
        histories = pa.Table.from_pandas(histories, preserve_index=False)
    if isinstance(histories, pa.Table):
        missing = {"user_id", "item_id"} - set(histories.column_names)
        if missing:
            raise DataError(f"a history table needs columns user_id, item_id (and optionally timestamp); missing {sorted(missing)}")
        t = histories.append_column("_row", pa.array(np.arange(histories.num_rows, dtype=np.int64)))
        has_t = "timestamp" in t.column_names
        order = [("user_id", "ascending")] + ([("timestamp", "ascending")] if has_t else []) + [("_row", "ascending")]
        t = t.sort_by(order)  # ties in time keep row order, as in the sequence build
        enc = pc.dictionary_encode(t["user_id"]).combine_chunks()
        codes = enc.indices.to_numpy()
        n = t.num_rows
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if n else np.zeros(0, np.int64)
        keys = t["user_id"].combine_chunks().take(pa.array(starts, pa.int64()))
        stamps = pc.cast(t["timestamp"], pa.int64()).combine_chunks().to_numpy(zero_copy_only=False) if has_t else None
        return keys, np.r_[starts, n].astype(np.int64), t["item_id"].combine_chunks(), stamps
    if isinstance(histories, dict):
        try:
            keys = pa.array(list(histories.keys()))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise DataError("the user keys of a history dict must share one type (all ints or all strings)") from None
        lists = [list(v) for v in histories.values()]
    elif _is_seq(histories) and not any(_is_seq(h) for h in histories):
        keys, lists = pa.array([0]), [list(histories)]  # one history given as a flat list ([] = one empty history)
    elif _is_seq(histories):
        keys, lists = pa.array(np.arange(len(histories), dtype=np.int64)), [list(h) for h in histories]
    else:
        raise DataError(f"histories must be a list of item ids, a list of lists, a dict user -> list, or a table; "
                        f"got {type(histories).__name__}")
    lens = np.array([len(x) for x in lists], dtype=np.int64)
    return keys, np.r_[0, np.cumsum(lens)].astype(np.int64), item_array([x for xs in lists for x in xs]), None


def item_array(ids: list) -> pa.Array:
    """Raw item ids as one Arrow array; ids of mixed types (``"12"`` beside ``12``) are refused, since
    the vocabulary holds one type and a silent cast would change which item is meant."""
    try:
        return pa.array(ids)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        kinds = sorted({type(x).__name__ for x in ids})
        examples = {t: next(repr(x) for x in ids if type(x).__name__ == t) for t in kinds}
        raise DataError(f"item ids of one call must share one type, got {', '.join(f'{t} (e.g. {e})' for t, e in examples.items())}; "
                        "pass them all as the vocabulary's type (see Recommender.item_id)") from None
