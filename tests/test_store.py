"""The run store stitches a shard back together across stages."""

import pyarrow as pa
import pytest

from curation import schema
from curation.store import GLOBAL, INGEST, MAP, RunStore, ShardView, StageRecord, UnsafeRunPath, split_by_shard, write_parquet_atomic


def test_columns_come_from_their_latest_writer_with_null_fallback(tmp_path):
    store = RunStore(tmp_path)
    ingest = StageRecord(0, "ingest", "ingest", INGEST, ["bytes", "role"])
    blur = StageRecord(1, "blur", "face_blur", MAP, ["bytes", "faces"])
    dedup = StageRecord(2, "dedup", "copy_dedup", GLOBAL, [])
    retrieve = StageRecord(3, "retrieve", "retrieve", GLOBAL, ["method"])
    uids = [schema.make_uid(4, i) for i in range(4)]
    write_parquet_atomic(pa.table({"uid": uids, "bytes": [b"a", b"b", b"c", b"d"], "role": ["pool"] * 4}), store.part_path(ingest, 4))
    # The blur stage replaced the bytes of row 1 only and dropped row 3.
    write_parquet_atomic(pa.table({"uid": uids[:3], "bytes": [None, b"B", None], "faces": [0, 1, 0]}), store.part_path(blur, 4))
    write_parquet_atomic(pa.table({"uid": [uids[0]]}), store.drops_path(dedup, 4))
    write_parquet_atomic(pa.table({"uid": [uids[2]], "method": ["sample"]}), store.annotations_path(retrieve, 4))
    view = ShardView(store, [ingest, blur, dedup, retrieve])
    t = view.read(4, ["bytes", "faces", "role", "method"])
    assert t.column("uid").to_pylist() == uids[1:3]
    assert t.column("bytes").to_pylist() == [b"B", b"c"]
    assert t.column("faces").to_pylist() == [1, 0]
    assert t.column("method").to_pylist() == [None, "sample"]
    assert view.shards() == [4]


def test_split_by_shard_groups_uids():
    t = pa.table({"uid": [schema.make_uid(2, 5), schema.make_uid(0, 1), schema.make_uid(2, 0)]})
    parts = split_by_shard(t)
    assert sorted(parts) == [0, 2] and parts[2].num_rows == 2


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_parquet_atomic(pa.table({"uid": [1]}), tmp_path / "x" / "part-00000.parquet")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["part-00000.parquet"]


@pytest.mark.parametrize("name", ["../x", "../../escape", "a/b", "..", "", "x\x00y"])
def test_every_stage_path_stays_inside_the_run_directory(tmp_path, name):
    store = RunStore(tmp_path / "run")
    rec = StageRecord(3, name, "decode", MAP, [])
    for build in (store.stage_dir, store.ledger_dir, lambda r: store.part_path(r, 0), lambda r: store.ledger_path(r, 0),
                  lambda r: store.shard_marker(r, 0), store.stage_marker):
        with pytest.raises(UnsafeRunPath, match="cannot name a directory inside"):
            build(rec)


def test_a_plain_stage_name_gets_its_own_directories(tmp_path):
    store = RunStore(tmp_path)
    rec = StageRecord(3, "sscd-v2", "embed", MAP, [])
    assert store.stage_dir(rec) == tmp_path.resolve() / "stages" / "03_sscd-v2"
    assert store.ledger_path(rec, 7) == tmp_path.resolve() / "ledger" / "03_sscd-v2" / "part-00007.parquet"
