"""Interaction readers on small files written in each format users have, and the leave-one-out split."""

import gzip
import json

import numpy as np
import pytest

from hybridzoo.data.recommendation import (SequenceData, detect_format, kcore_filter, read_interactions,
                                           synthetic_interactions)

# (user, item, time): u1 has 4 items, u2 has 3, u3 has 1 (dropped: fewer than 3)
ROWS = [("u1", "a", 10), ("u2", "b", 5), ("u1", "b", 30), ("u1", "c", 20), ("u2", "a", 6), ("u1", "d", 40),
        ("u2", "c", 7), ("u3", "a", 1)]


def write_all(tmp_path):
    files = {}
    p = tmp_path / "reviews_Beauty_5.json.gz"
    with gzip.open(p, "wt") as f:
        for u, i, t in ROWS:
            f.write(json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": t,
                                "reviewTime": "01 1, 2014", "summary": "ok"}) + "\n")
    files["amazon2014"] = p
    p = tmp_path / "Beauty.csv"
    p.write_text("".join(f"{i},{u},5.0,{t}\n" for u, i, t in ROWS))
    files["amazon2018"] = p
    p = tmp_path / "ratings.dat"
    p.write_text("".join(f"{u[1:]}::{ord(i)}::4::{t}\n" for u, i, t in ROWS))
    files["movielens-dat"] = p
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u[1:]},{ord(i)},4.0,{t}\n" for u, i, t in ROWS))
    files["movielens-csv"] = p
    p = tmp_path / "Beauty.inter"
    p.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in ROWS))
    files["recbole"] = p
    p = tmp_path / "log.csv"
    p.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in ROWS))
    files["csv"] = p
    return files


def test_every_format_is_detected_and_read_the_same(tmp_path):
    for fmt, path in write_all(tmp_path).items():
        assert detect_format(path) == fmt
        users, items, times = read_interactions(path)
        assert len(users) == len(ROWS)
        data = SequenceData.from_interactions(users, items, times)
        assert data.num_users == 2  # u3 has a single interaction
        seqs = [data.items[data.indptr[u]:data.indptr[u + 1]] for u in range(2)]
        tok = data.item_tokens
        got = sorted(tuple(tok[i] for i in s) for s in seqs)
        a, b, c, d = (("a", "b", "c", "d") if fmt not in ("movielens-dat", "movielens-csv")
                      else tuple(str(ord(x)) for x in "abcd"))
        assert got == sorted([(a, c, b, d), (b, a, c)]), fmt  # chronological, not file order


def test_errors_name_the_file_and_the_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_interactions(tmp_path / "missing.csv")
    bad = tmp_path / "x.parquet"
    bad.write_text("?")
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_interactions(bad)
    broken = tmp_path / "reviews_X_5.json"
    broken.write_text('{"reviewerID": "u"}\n')
    with pytest.raises(ValueError, match="not a valid amazon2014"):
        read_interactions(broken)


def test_kcore_is_iterative():
    # item z has 2 interactions; removing it leaves user u2 with 2 < 2? use k=2: u3 only has z
    users = np.array(["u1", "u1", "u2", "u2", "u3", "u3"], dtype=object)
    items = np.array(["a", "b", "a", "b", "z", "a"], dtype=object)
    keep = kcore_filter(users, items, 2)
    # z appears once -> removed -> u3 keeps one interaction -> removed -> a still has 2
    assert keep.tolist() == [True, True, True, True, False, False]


def test_leave_one_out_prefixes_and_truncation():
    users = np.array(["u"] * 6, dtype=object)
    items = np.array(list("abcdef"), dtype=object)
    data = SequenceData.from_interactions(users, items, np.arange(6.0))
    seq, lengths, target = data.train_samples(max_len=2)
    # training part a b c d -> (a)->b, (a b)->c, (b c)->d  (truncated to the last 2)
    assert target.tolist() == [2, 3, 4]
    assert seq.tolist() == [[1, 0], [1, 2], [2, 3]] and lengths.tolist() == [1, 2, 2]
    _, vseq, vlen, vt = data.eval_samples("valid", max_len=3)
    assert vseq.tolist() == [[2, 3, 4]] and vt.tolist() == [5]
    _, tseq, tlen, tt = data.eval_samples("test", max_len=3)
    assert tseq.tolist() == [[3, 4, 5]] and tt.tolist() == [6]
    rows, hist = data.history(np.array([0]), "test")
    assert hist.tolist() == [1, 2, 3, 4, 5]


def test_negatives_are_unseen_distinct_and_deterministic():
    users, items, times = synthetic_interactions(num_users=200, num_items=300, seed=1)
    data = SequenceData.from_interactions(users, items, times)
    neg = data.sample_negatives(100, seed=0)
    assert neg.shape == (data.num_users, 100)
    assert (neg >= 1).all() and (neg < data.num_items).all()
    for u in range(0, data.num_users, 17):
        seen = set(data.items[data.indptr[u]:data.indptr[u + 1]].tolist())
        assert not seen & set(neg[u].tolist())
        assert len(set(neg[u].tolist())) == 100
    assert np.array_equal(neg, data.sample_negatives(100, seed=0))


def test_synthetic_log_is_deterministic_and_has_sequential_signal():
    a = synthetic_interactions(num_users=300, seed=3)
    b = synthetic_interactions(num_users=300, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    data = SequenceData.from_interactions(*a)
    # short-term signal: the most frequent successor of an item is far above chance
    pairs = {}
    for u in range(data.num_users):
        s = data.items[data.indptr[u]:data.indptr[u + 1]]
        for x, y in zip(s[:-1], s[1:]):
            pairs.setdefault(x, []).append(y)
    top = np.mean([np.bincount(v).max() / len(v) for v in pairs.values() if len(v) >= 10])
    assert top > 0.1  # vs ~1/1000 for independent draws


@pytest.fixture
def tokyo_local_time(monkeypatch):
    """A local zone other than UTC, so that a naive time read as local time would show."""
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_iso8601_timestamps_are_parsed_and_order_the_history(tmp_path, tokyo_local_time):
    # the order by time differs from the file order, and the formats mix as real exports do
    rows = ["user,item,timestamp",
            "u1,a,2024-01-05T10:00:00Z",
            "u1,b,2024-01-05 09:00:00",            # naive: UTC, one hour earlier than a
            "u1,c,2024-01-05T12:30:00+01:00",      # 11:30 UTC: after a
            "u1,d,1704400000"]                     # Unix seconds: 2024-01-04 20:26:40 UTC, the earliest
    path = tmp_path / "export.csv"
    path.write_text("\n".join(rows) + "\n")
    users, items, times = read_interactions(path)
    assert times.tolist() == [1704448800.0, 1704445200.0, 1704454200.0, 1704400000.0]
    data = SequenceData.from_interactions(users, items, times)
    assert [data.item_tokens[i] for i in data.items] == ["d", "b", "a", "c"]
    for name, text in (("ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,2024-01-05T10:00:00Z\n"),
                       ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t2024-01-05T10:00:00\n")):
        (tmp_path / name).write_text(text)
        assert read_interactions(tmp_path / name)[2].tolist() == [1704448800.0]


def test_a_bad_timestamp_names_the_file_row_and_column(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\nu1,a,1700000000\nu1,b,05/01/2024 10:00\n")
    with pytest.raises(ValueError, match=r"log\.csv, row 3, column 'timestamp': cannot read '05/01/2024 10:00' "
                                         r"as a timestamp; expected Unix seconds or ISO-8601"):
        read_interactions(path)
    amazon = tmp_path / "Beauty.csv"
    amazon.write_text("i1,u1,5.0,1700000000\ni2,u1,4.0,yesterday\n")
    with pytest.raises(ValueError, match=r"Beauty\.csv, row 2, column 4 \(timestamp\): cannot read 'yesterday'"):
        read_interactions(amazon)


def test_too_small_a_catalogue_for_the_negatives_says_the_minimum(tmp_path):
    users = np.array(["u1"] * 6 + ["u2"] * 3, dtype=object)
    items = np.array(["a", "b", "c", "d", "e", "f", "g", "h", "a"], dtype=object)
    data = SequenceData.from_interactions(users, items, np.arange(9, dtype=np.float64))
    assert data.sample_negatives(2).shape == (2, 2)      # 8 items, u1 saw 6: 2 left
    with pytest.raises(ValueError, match=r"--num-negatives 3 needs .* the catalogue has 8 items and the most active "
                                         r"user has interacted with 6 of them, so the catalogue needs at least 9 "
                                         r"items; lower --num-negatives to at most 2"):
        data.sample_negatives(3)
