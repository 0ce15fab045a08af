"""Interaction logs for sequential recommendation: readers, k-core filtering, leave-one-out sequences.

Formats read (the files users have):
- Amazon 2014 `reviews_<Category>_5.json(.gz)`: one JSON object per line (reviewerID, asin, unixReviewTime);
- Amazon 2018 ratings `<Category>.csv`: `item,user,rating,timestamp`, no header;
- MovieLens `ratings.dat` (`UserID::MovieID::Rating::Timestamp`) and `ratings.csv` (userId,movieId,rating,timestamp);
- RecBole atomic `.inter` files (tab-separated, typed header such as `user_id:token`);
- a plain CSV with a header naming `user`, `item` and `timestamp` columns.

Timestamps are Unix seconds or ISO-8601 date-times (`2024-01-05T10:00:00`, `2024-01-05 10:00:00`, with
`Z` or an offset such as `+01:00`; a time without an offset is taken as UTC), as most exports write them;
one that is neither is an error naming the file, the row and the column.

Item ids are remapped to 1..N in order of first appearance (0 is padding), users to 0..U−1. Every user's
interactions are sorted by time (stable), the last item is the test target, the second-to-last the
validation target (RecBole's `LS: valid_and_test` with `order: TO`).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["read_interactions", "kcore_filter", "SequenceData", "synthetic_interactions", "FORMATS", "parse_timestamp"]

FORMATS = ("amazon2014", "amazon2018", "movielens-dat", "movielens-csv", "recbole", "csv")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".json", ".json.gz", ".jsonl", ".jsonl.gz")):
        return "amazon2014"
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(".dat"):
        return "movielens-dat"
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        with _open_text(path) as f:
            first = f.readline().strip().lower()
        cols = [c.strip() for c in first.split(",")]
        if {"userid", "movieid"} <= set(cols):
            return "movielens-csv"
        if "user" in cols and "item" in cols:
            return "csv"
        return "amazon2018"
    raise ValueError(f"cannot tell the format of {str(path)!r}; expected one of: reviews_<Category>_5.json.gz "
                     f"(Amazon 2014), <Category>.csv (Amazon 2018 item,user,rating,timestamp), ratings.dat / "
                     f"ratings.csv (MovieLens), *.inter (RecBole), or a CSV with a user,item,timestamp header; "
                     f"pass --format to choose one of {FORMATS}")


def parse_timestamp(value: str | float, where: str = "") -> float:
    """Unix seconds from a number or an ISO-8601 date-time (naive times are UTC); `where` names the
    file, row and column in the error."""
    try:
        t = float(value)
        if math.isfinite(t):
            return t
    except (TypeError, ValueError):
        pass
    text = str(value).strip()
    try:
        # Python < 3.11 rejects a trailing Z and needs a space or T between date and time
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" and text else text)
    except ValueError:
        raise ValueError(f"{where}: cannot read {text!r} as a timestamp; expected Unix seconds or ISO-8601 "
                         "(2024-01-05T10:00:00, 2024-01-05 10:00:00, optionally with Z or +01:00)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def read_interactions(path: str | os.PathLike, fmt: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user tokens, item tokens, timestamps) as numpy arrays, one entry per interaction."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interaction file not found: {str(path)!r}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown interaction format {fmt!r}; expected one of {FORMATS}")
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    where = str(path)
    try:
        with _open_text(path) as f:
            if fmt == "amazon2014":
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)  # strict JSON only: nothing is evaluated
                    users.append(str(rec["reviewerID"]))
                    items.append(str(rec["asin"]))
                    times.append(float(rec["unixReviewTime"]))
            elif fmt == "amazon2018":
                for n, row in enumerate(csv.reader(f), 1):
                    if row:
                        items.append(row[0])
                        users.append(row[1])
                        times.append(parse_timestamp(row[3], f"{where}, row {n}, column 4 (timestamp)"))
            elif fmt == "movielens-dat":
                for n, line in enumerate(f, 1):
                    if line.strip():
                        u, i, _r, t = line.strip().split("::")[:4]
                        users.append(u)
                        items.append(i)
                        times.append(parse_timestamp(t, f"{where}, line {n}, field 4 (timestamp)"))
            elif fmt == "movielens-csv":
                reader = csv.DictReader(f)
                for n, row in enumerate(reader, 2):
                    users.append(row["userId"])
                    items.append(row["movieId"])
                    times.append(parse_timestamp(row["timestamp"], f"{where}, row {n}, column 'timestamp'"))
            elif fmt == "recbole":
                header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
                try:
                    ui, ii, ti = header.index("user_id"), header.index("item_id"), header.index("timestamp")
                except ValueError as e:
                    raise ValueError(f"{str(path)!r}: a RecBole .inter file needs user_id, item_id and timestamp "
                                     f"columns, found {header}") from e
                for n, line in enumerate(f, 2):
                    if line.strip():
                        row = line.rstrip("\n").split("\t")
                        users.append(row[ui])
                        items.append(row[ii])
                        times.append(parse_timestamp(row[ti], f"{where}, row {n}, column 'timestamp'"))
            else:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or not {"user", "item", "timestamp"} <= set(reader.fieldnames):
                    raise ValueError(f"{str(path)!r}: expected a CSV header with user,item,timestamp columns, "
                                     f"found {reader.fieldnames}")
                for n, row in enumerate(reader, 2):
                    users.append(row["user"])
                    items.append(row["item"])
                    times.append(parse_timestamp(row["timestamp"], f"{where}, row {n}, column 'timestamp'"))
    except (KeyError, IndexError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not a valid {fmt} interaction file: {e!r}") from e
    if not users:
        raise ValueError(f"{str(path)!r} holds no interactions")
    return np.asarray(users, dtype=object), np.asarray(items, dtype=object), np.asarray(times, dtype=np.float64)


def kcore_filter(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions kept after iterative k-core filtering (users and items ≥ k)."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    _, u = np.unique(users, return_inverse=True)
    _, i = np.unique(items, return_inverse=True)
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1)
        ic = np.bincount(i[keep], minlength=i.max() + 1)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


@dataclass
class SequenceData:
    """Chronological item sequences of every user in CSR form (`indptr`, `items`), items 1..num_items−1."""

    indptr: np.ndarray      # (U+1,)
    items: np.ndarray       # (total,) int64, chronologically ordered per user
    num_items: int          # including the padding id 0
    item_tokens: list[str]  # item_tokens[i] is the original id of item i (index 0: "[PAD]")
    user_tokens: list[str]

    @classmethod
    def from_interactions(cls, users, items, times, kcore: int = 0) -> "SequenceData":
        keep = kcore_filter(users, items, kcore)
        users, items, times = users[keep], items[keep], times[keep]
        # Users need >= 3 interactions for a train prefix, a validation and a test target.
        _, uinv, ucount = np.unique(users, return_inverse=True, return_counts=True)
        keep = ucount[uinv] >= 3
        users, items, times = users[keep], items[keep], times[keep]
        if len(users) == 0:
            raise ValueError("no user has 3 or more interactions after filtering; lower --kcore")
        user_tok, uidx = np.unique(users, return_inverse=True)
        # item ids in order of first appearance, 1-based
        item_tok, first, iidx = np.unique(items, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        remap = np.empty(len(order), dtype=np.int64)
        remap[order] = np.arange(1, len(order) + 1)
        iidx = remap[iidx]
        # chronological per user, ties kept in file order
        perm = np.lexsort((np.arange(len(uidx)), times, uidx))
        counts = np.bincount(uidx, minlength=len(user_tok))
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr=indptr, items=iidx[perm].astype(np.int64), num_items=len(item_tok) + 1,
                   item_tokens=["[PAD]"] + [str(t) for t in item_tok[order]], user_tokens=[str(t) for t in user_tok])

    @property
    def num_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_interactions(self) -> int:
        return len(self.items)

    def _left_aligned(self, starts: np.ndarray, ends: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Histories items[starts:ends] truncated to the last max_len, left-aligned and 0-padded."""
        lengths = np.minimum(ends - starts, max_len)
        idx = (ends - lengths)[:, None] + np.arange(max_len)[None]
        valid = np.arange(max_len)[None] < lengths[:, None]
        seq = np.where(valid, self.items[np.minimum(idx, len(self.items) - 1)], 0)
        return seq.astype(np.int64), lengths.astype(np.int64)

    def train_samples(self, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every prefix of every user's training part (all but the last two items) → (seq, length, target)."""
        starts, ends = self.indptr[:-1], self.indptr[1:] - 2
        n_targets = np.maximum(ends - starts - 1, 0)
        user = np.repeat(np.arange(self.num_users), n_targets)
        offset = np.arange(n_targets.sum()) - np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
        pos = starts[user] + 1 + offset  # global index of each target
        seq, lengths = self._left_aligned(starts[user], pos, max_len)
        return seq, lengths, self.items[pos]

    def eval_samples(self, split: str, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One sample per user: (user, seq, length, target); 'valid' targets the second-to-last item, 'test' the last."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        shift = 2 if split == "valid" else 1
        starts, pos = self.indptr[:-1], self.indptr[1:] - shift
        seq, lengths = self._left_aligned(starts, pos, max_len)
        return np.arange(self.num_users), seq, lengths, self.items[pos]

    def history(self, users: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs of each user's whole history before the split's target (for exclusion)."""
        shift = 2 if split == "valid" else 1
        starts, ends = self.indptr[users], self.indptr[users + 1] - shift
        n = ends - starts
        row = np.repeat(np.arange(len(users)), n)
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return row, self.items[starts[row] + offset]

    def item_popularity(self) -> np.ndarray:
        """Interaction counts of each item in the training parts (all but each user's last two)."""
        starts, ends = self.indptr[:-1], self.indptr[1:] - 2
        n = ends - starts
        row = np.repeat(np.arange(self.num_users), n)
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return np.bincount(self.items[starts[row] + offset], minlength=self.num_items)

    def sample_negatives(self, num: int = 100, seed: int = 0) -> np.ndarray:
        """(U, num) distinct items drawn uniformly from those each user never interacted with (RecBole's uni100)."""
        rng = np.random.default_rng(seed)
        U, N = self.num_users, self.num_items
        counts = np.diff(self.indptr)
        if num < 1:
            raise ValueError(f"--num-negatives must be at least 1, got {num}")
        if N - 1 - counts.max() < num:
            # every user needs `num` items it never interacted with: catalogue >= longest history + num
            most = int(counts.max())
            hint = (f"lower --num-negatives to at most {N - 1 - most}" if N - 1 > most
                    else "the sampled protocol cannot run on this log")
            raise ValueError(f"--num-negatives {num} needs every user to have {num} items it never interacted with: "
                             f"the catalogue has {N - 1} items and the most active user has interacted with {most} "
                             f"of them, so the catalogue needs at least {most + num} items; {hint}")
        seen = np.unique(np.repeat(np.arange(U), counts) * N + self.items)
        out = np.zeros((U, num), dtype=np.int64)
        todo = np.arange(U)
        draws = 2 * num
        while len(todo):
            cand = np.sort(rng.integers(1, N, size=(len(todo), draws)), axis=1)
            bad = np.isin(todo[:, None] * N + cand, seen)
            bad[:, 1:] |= cand[:, 1:] == cand[:, :-1]  # duplicates within a row
            # a uniformly random subset of the valid distinct candidates
            priority = np.where(bad, np.inf, rng.random(cand.shape))
            pick = np.argsort(priority, axis=1)[:, :num]
            enough = np.isfinite(np.take_along_axis(priority, pick, axis=1)).all(axis=1)
            out[todo[enough]] = np.take_along_axis(cand, pick, axis=1)[enough]
            todo, draws = todo[~enough], draws * 2
        return out


def synthetic_interactions(num_users: int = 3000, num_items: int = 1000, num_genres: int = 20,
                           min_len: int = 8, max_len: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A SYNTHETIC interaction log whose next item depends on the last items and on the user's taste.

    Items fall into equal-sized genres; each item has three "follow-up" items, mostly of its own genre
    (the short-term signal: what comes after what). Each user has a taste concentrated on a few genres
    (the long-term signal). The next item is a follow-up of the last item (or, less often, of the one
    before) with probability 0.5, a Zipf-popular item of a genre drawn from the user's taste with
    probability 0.4, and a uniformly random item otherwise. Deterministic by seed.
    """
    rng = np.random.default_rng(seed)
    per = num_items // num_genres
    num_items = per * num_genres
    genre_items = rng.permutation(num_items).reshape(num_genres, per)   # genre -> its items
    genre_of = np.empty(num_items, dtype=np.int64)
    genre_of[genre_items] = np.arange(num_genres)[:, None]
    same = genre_items[genre_of[:, None], rng.integers(0, per, size=(num_items, 3))]
    follow = np.where(rng.random((num_items, 3)) < 0.8, same, rng.integers(0, num_items, size=(num_items, 3)))
    zipf_cdf = np.cumsum(1.0 / np.arange(1, per + 1) ** 0.8)
    zipf_cdf /= zipf_cdf[-1]
    taste_cdf = np.cumsum(rng.dirichlet(np.full(num_genres, 0.15), size=num_users), axis=1)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    seq = np.zeros((num_users, max_len), dtype=np.int64)
    for t in range(max_len):  # vectorised over users
        r = rng.random(num_users)
        g = np.minimum((taste_cdf < rng.random(num_users)[:, None]).sum(1), num_genres - 1)
        rank = np.minimum(np.searchsorted(zipf_cdf, rng.random(num_users)), per - 1)
        nxt = genre_items[g, rank]                                         # long-term: the user's taste
        if t > 0:
            prev = seq[:, t - 1] if t == 1 else np.where(rng.random(num_users) < 0.7, seq[:, t - 1], seq[:, t - 2])
            nxt = np.where(r < 0.5, follow[prev, rng.integers(0, 3, num_users)], nxt)  # short-term
        nxt = np.where(r >= 0.9, rng.integers(0, num_items, num_users), nxt)           # noise
        seq[:, t] = nxt
    mask = np.arange(max_len)[None] < lengths[:, None]
    users = np.repeat(np.array([f"u{u}" for u in range(num_users)], dtype=object), lengths)
    items = np.array([f"i{i}" for i in seq[mask]], dtype=object)
    times = np.broadcast_to(np.arange(max_len, dtype=np.float64), seq.shape)[mask]
    return users, items, times
