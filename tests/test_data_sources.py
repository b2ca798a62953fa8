"""The data path without a model: bad samples with readable reasons, JSONL by line offsets, shards
streamed disjointly per rank with exact resume, decoding ahead in threads."""
import threading
import time
from itertools import islice

import pytest

from fixtures_data import write_bad_jsonl, write_bad_parquet, write_bad_webdataset
from theworld.data.prefetch import Prefetcher
from theworld.data.shards import ShardSource, ShardStream
from theworld.data.sources import BadSample, DataError, JsonlDataset, SampleStream


def read_all(loads) -> dict:
    """``{id: reason or None}`` of everything a finite stream of loads yields, through the prefetcher."""
    out = {}
    for _, sample in Prefetcher(loads, workers=2):
        key = sample.sample_id if isinstance(sample, BadSample) else sample["id"]
        assert key not in out
        out[key] = sample.reason if isinstance(sample, BadSample) else None
    return out


def assert_reasons(got: dict, expected: dict):
    assert set(got) == set(expected)
    for key, reason in expected.items():
        if reason is None:
            assert got[key] is None, (key, got[key])
        else:
            assert got[key] and reason in got[key], (key, got[key])


def test_every_kind_of_bad_jsonl_line_is_a_bad_sample_with_a_reason(tmp_path):
    path, expected = write_bad_jsonl(tmp_path)
    data = JsonlDataset(path)
    assert not hasattr(data, "records") and len(data.starts) == len(data) == 15  # an index, not the records
    assert_reasons(read_all(islice(SampleStream(data, shuffle=False).iter_loads_from(0), len(data))), expected)


@pytest.mark.parametrize("write", [write_bad_parquet, write_bad_webdataset], ids=["parquet", "webdataset"])
def test_every_kind_of_bad_shard_sample_is_a_bad_sample_with_a_reason(tmp_path, write):
    spec, expected = write(tmp_path)
    source = ShardSource(spec)
    assert len(source) == 2
    assert_reasons(read_all(ShardStream(source, shuffle=False, max_epochs=1).iter_loads_from(0)), expected)


def test_a_shard_that_breaks_midway_ledgers_each_lost_sample(tmp_path):
    from fixtures_data import add_member

    spec, expected = write_bad_webdataset(tmp_path, shards=1)
    import tarfile

    with tarfile.open(tmp_path / "train-00000.tar", "a") as tar:  # a member datasets cannot parse, then one more sample
        add_member(tar, "broken.json", b"{not json")
        add_member(tar, "after.json", b'{"messages": []}')
    got = read_all(ShardStream(ShardSource(spec), shuffle=False, max_epochs=1).iter_loads_from(0))
    assert "cannot read train-00000.tar" in got["broken"] and "cannot read train-00000.tar" in got["after"]


def test_start_up_problems_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        JsonlDataset(tmp_path / "missing.jsonl")
    (tmp_path / "notes.jsonl").write_text("hello\n")
    with pytest.raises(DataError, match="is not JSONL"):
        JsonlDataset(tmp_path / "notes.jsonl")
    with pytest.raises(DataError, match="no such shard"):
        ShardSource(str(tmp_path / "none-*.parquet"))
    spec, _ = write_bad_parquet(tmp_path / "p")
    with pytest.raises(DataError, match="no image column 'picture'"):
        ShardSource(spec, columns="images=picture")


def shard_ids(stream: ShardStream, start: int, count: int) -> list[str]:
    ids = []
    for position, load in stream.iter_loads_from(start):
        try:
            ids.append(load()["id"])
        except BadSample as e:
            ids.append(e.sample_id)
        if len(ids) == count:
            return ids


def test_ranks_read_disjoint_shards_and_resume_at_any_position(tmp_path):
    spec, expected = write_bad_parquet(tmp_path, shards=3)  # 13 rows over 3 shards: 5, 5, 3
    source = ShardSource(spec)
    total = len(expected)
    ranks = [ShardStream(source, seed=1, rank=r, world_size=2) for r in range(2)]
    # The first three draws (one epoch of shards) go to ranks 0, 1, 0: together every row once.
    first = [ranks[0].shard_at(0)[1], ranks[1].shard_at(0)[1], ranks[0].shard_at(1)[1]]
    assert sorted(first) == source.paths
    rows = shard_ids(ranks[0], 0, source.length(first[0]) + source.length(first[2])) + shard_ids(
        ranks[1], 0, source.length(first[1]))
    assert sorted(rows) == sorted(expected) and len(rows) == total
    # Resume: a fresh stream (only the saved state) continues exactly, mid-shard or at a shard's start.
    whole = shard_ids(ranks[0], 0, 3 * total)
    for position in (0, 3, source.length(first[0]), 2 * total + 1):
        fresh = ShardStream(ShardSource(spec), seed=1, rank=0, world_size=2)
        fresh.load_state_dict(ranks[0].state_dict())
        assert shard_ids(fresh, position, 3 * total - position) == whole[position:]


def test_prefetcher_keeps_order_decodes_off_the_callers_thread_and_stays_bounded():
    started, threads = [], set()

    def load(i):
        started.append(i)
        threads.add(threading.get_ident())
        time.sleep(0.002 * (i % 3))  # out-of-order completion
        if i == 5:
            raise OSError("disk gone for this one")
        return {"id": i}

    reader = Prefetcher(((i, lambda i=i: load(i)) for i in range(1000)), workers=3, depth=8)
    taken = [next(reader) for _ in range(20)]
    time.sleep(0.2)
    assert [p for p, _ in taken] == list(range(20))
    assert [s["id"] for p, s in taken if p != 5] == [i for i in range(20) if i != 5]
    assert isinstance(taken[5][1], BadSample) and "disk gone" in taken[5][1].reason
    assert threading.get_ident() not in threads
    assert len(started) <= 20 + 8 + 3 + 1  # taken + queued + in the pool + the reader's hand
    reader.close()
