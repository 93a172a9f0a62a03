"""The deduplication stages as the runner calls them: run(table) -> drops + summary."""

import json

import numpy as np
import pyarrow as pa
import pytest

from curation import schema
from curation.config import PipelineConfig
from curation.dedup.synthetic import planted_groups
from curation.stage import StageContext
from curation.stages.copy_dedup import CopyDedupStage
from curation.stages.decontaminate import DecontaminateStage
from curation.stages.pca_hash import PcaHashStage
from curation.stages.phash import PhashStage
from curation.stages.phash_dedup import PhashDedupStage


def make_stage(cls, tmp_path, **cfg):
    config = cls.Config.model_validate({"kind": cls.kind, **cfg})
    return cls(config, StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s"))


def rows_table(n, roles=None, width=None, height=None, **columns):
    roles = roles or [schema.POOL] * n
    width = width if width is not None else [100] * n
    height = height if height is not None else [100] * n
    uid = np.arange(n, dtype=np.int64) * 7 + 3  # not positions: the stages must use uids
    table = {
        schema.UID: pa.array(uid, pa.int64()),
        schema.ROLE: pa.array(roles, pa.string()),
        schema.ID: pa.array([f"sha{i}" for i in range(n)]),
        schema.SOURCE_KEY: pa.array([f"img/{i}.jpg" for i in range(n)]),
        schema.WIDTH: pa.array(width, pa.int32()),
        schema.HEIGHT: pa.array(height, pa.int32()),
    }
    table.update(columns)
    return pa.table(table)


def descriptor_column(x, dtype=pa.float16()):
    flat = pa.array(np.asarray(x).reshape(-1).astype(np.float16 if dtype == pa.float16() else np.float32), dtype)
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def drops_by_uid(result):
    return {
        uid: (reason, json.loads(details))
        for uid, reason, details in zip(*(result.drops.column(c).to_pylist() for c in (schema.UID, schema.DROP_REASON, schema.DROP_DETAILS)))
    }


# -- copy_dedup ------------------------------------------------------------------------------
def test_copy_dedup_finds_planted_groups_exactly_and_keeps_the_largest(tmp_path):
    planted = planted_groups(1500, 128, duplicate_fraction=0.3, seed=5, topics=8)
    rng = np.random.default_rng(0)
    width = rng.integers(100, 400, 1500).tolist()
    height = [200] * 1500
    table = rows_table(1500, width=width, height=height, sscd_descriptor=descriptor_column(planted.x))
    result = make_stage(CopyDedupStage, tmp_path).run(table)
    drops = drops_by_uid(result)
    uid = table.column(schema.UID).to_numpy()
    area = np.asarray(width) * 200
    expected = {}
    for g in np.unique(planted.group):
        members = np.flatnonzero(planted.group == g)
        keep = members[np.lexsort((uid[members], -area[members]))[0]]
        expected.update({int(uid[m]): int(uid[keep]) for m in members if m != keep})
    assert {u: d["kept_uid"] for u, (_, d) in drops.items()} == expected
    for u, (reason, details) in drops.items():
        assert reason == "near_duplicate"
        kept = int(np.flatnonzero(uid == details["kept_uid"])[0])
        assert details["kept_id"] == f"sha{kept}" and details["kept_source_key"] == f"img/{kept}.jpg"
        me = int(np.flatnonzero(uid == u)[0])
        assert details["similarity"] == pytest.approx(float(planted.x[me] @ planted.x[kept]), abs=2e-3)
    s = result.summary
    assert s["dropped"] == len(expected)
    assert s["components"] == int((np.bincount(planted.group) > 1).sum())
    assert s["rows"] == 1500 and s["index"]["spec"] == "Flat" and s["edges"] >= len(expected)


def test_copy_dedup_counts_components_and_reports_the_index(tmp_path):
    x = np.eye(8, 16, dtype=np.float32)
    x = np.vstack([x, x[:3] + 0.05])  # three pairs of copies
    table = rows_table(11, sscd_descriptor=descriptor_column(x, pa.float32()))
    result = make_stage(CopyDedupStage, tmp_path, index={"spec": "HNSW32"}).run(table)
    assert result.summary["components"] == 3 and result.summary["dropped"] == 3 and result.summary["edges"] == 3
    assert result.summary["index"]["spec"] == "HNSW32"
    assert set(drops_by_uid(result)) == {int(u) for u in table.column(schema.UID).to_numpy()[8:]}


def test_rows_without_descriptor_pass_through(tmp_path):
    x = np.tile(np.eye(1, 16, dtype=np.float32), (3, 1))
    col = descriptor_column(x)
    col = pa.FixedSizeListArray.from_arrays(col.values, 16, mask=pa.array([False, True, False]))
    table = rows_table(3, sscd_descriptor=col)
    result = make_stage(CopyDedupStage, tmp_path).run(table)
    assert result.drops.num_rows == 1 and result.summary["skipped_no_descriptor"] == 1


# -- decontaminate ---------------------------------------------------------------------------
def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def test_decontamination_drops_whole_components_that_touch_an_eval_image(tmp_path):
    basis = np.eye(23, 64, dtype=np.float32)
    e = basis[0]
    a = unit(basis[0] + basis[1])  # cos(a, e) = 0.71: linked to the eval image
    b = basis[1]  # cos(b, e) = 0 but cos(a, b) = 0.71: dropped only through a's component
    x = np.vstack([e, a, b, *basis[3:]])  # plus 20 unrelated pool images
    roles = [schema.EXCLUDE, schema.POOL, schema.POOL] + [schema.POOL] * 20
    table = rows_table(len(x), roles=roles, sscd_descriptor=descriptor_column(x, pa.float32()))
    assert float(b @ e) < 0.45 < float(a @ b) and float(a @ e) > 0.45
    result = make_stage(DecontaminateStage, tmp_path).run(table)
    uid = table.column(schema.UID).to_numpy()
    drops = drops_by_uid(result)
    assert set(drops) == {int(uid[1]), int(uid[2])}
    for reason, details in drops.values():
        assert reason == "eval_contamination"
        assert details["eval_uid"] == int(uid[0]) and details["eval_id"] == "sha0" and details["eval_source_key"] == "img/0.jpg"
    assert drops[int(uid[1])][1]["similarity"] == pytest.approx(float(a @ e), abs=1e-4)
    assert result.summary["contaminated_components"] == 1 and result.summary["dropped"] == 2


def test_decontamination_without_eval_images_drops_nothing(tmp_path):
    x = np.tile(np.eye(1, 8, dtype=np.float32), (3, 1))
    table = rows_table(3, sscd_descriptor=descriptor_column(x))
    result = make_stage(DecontaminateStage, tmp_path).run(table)
    assert result.drops.num_rows == 0 and result.summary["eval_rows"] == 0


def test_decontamination_names_the_nearest_eval_image(tmp_path):
    e1, e2 = np.eye(2, 32, dtype=np.float32)
    p = unit(0.8 * e1 + 0.6 * e2)  # cos 0.8 to e1, 0.6 to e2: all one component
    table = rows_table(3, roles=[schema.EXCLUDE, schema.EXCLUDE, schema.POOL], sscd_descriptor=descriptor_column(np.vstack([e1, e2, p]), pa.float32()))
    result = make_stage(DecontaminateStage, tmp_path).run(table)
    (_, details), = drops_by_uid(result).values()
    assert details["eval_id"] == "sha0" and details["similarity"] == pytest.approx(0.8, abs=1e-4)


# -- phash / phash_dedup ---------------------------------------------------------------------
def test_phash_stage_hashes_images_and_drops_undecodable_ones(tmp_path, jpeg_factory):
    stage = make_stage(PhashStage, tmp_path, method="dhash", column="dh")
    stage.setup()
    batch = pa.table({schema.BYTES: pa.array([jpeg_factory(1), jpeg_factory(2), b"\xff\xd8\xffgarbage"], pa.binary())})
    out = stage.process(batch)
    assert out.schema.field("dh").type == pa.uint64()
    hashes = out.column("dh").to_pylist()
    assert hashes[0] != hashes[1] and hashes[2] is None
    mirrored = out.column("dh_flip").to_pylist()
    assert mirrored[0] not in (None, hashes[0]) and mirrored[2] is None
    assert out.column(schema.DROP_REASON).to_pylist()[:2] == [None, None]
    assert out.column(schema.DROP_REASON)[2].as_py() in ("corrupt", "truncated")


def test_phash_dedup_groups_by_radius_and_keeps_the_largest(tmp_path):
    base = np.array([0x0F0F0F0F0F0F0F0F, 0x123456789ABCDEF0, 0xFFFF0000FFFF0000], np.uint64)
    hashes = np.array([base[0], base[0] ^ np.uint64(0b111), base[1], base[2], base[2] ^ np.uint64(1 << 60)], np.uint64)
    width = [100, 300, 100, 50, 50]
    table = rows_table(5, width=width, phash=pa.array(hashes, pa.uint64()))
    result = make_stage(PhashDedupStage, tmp_path, radius=3, flip=False).run(table)
    uid = table.column(schema.UID).to_numpy()
    drops = drops_by_uid(result)
    assert drops == {
        int(uid[0]): ("phash_duplicate", {"kept_uid": int(uid[1]), "kept_id": "sha1", "kept_source_key": "img/1.jpg", "hamming_distance": 3, "component_size": 2}),
        int(uid[4]): ("phash_duplicate", {"kept_uid": int(uid[3]), "kept_id": "sha3", "kept_source_key": "img/3.jpg", "hamming_distance": 1, "component_size": 2}),
    }
    assert result.summary["components"] == 2 and result.summary["index"] == "flat"
    assert make_stage(PhashDedupStage, tmp_path, radius=2, flip=False).run(table).summary["dropped"] == 1


def test_phash_dedup_matches_mirrored_copies_through_the_flip_hash(tmp_path, jpeg_factory):
    from PIL import Image, ImageOps
    import io

    original = jpeg_factory(7, size=(160, 120))
    buf = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(original))).save(buf, "JPEG", quality=90)
    images = [original, buf.getvalue(), jpeg_factory(8, size=(160, 120))]
    hasher = make_stage(PhashStage, tmp_path)
    hashes = hasher.process(pa.table({schema.BYTES: pa.array(images, pa.binary())}))
    table = rows_table(3, phash=hashes.column("phash"), phash_flip=hashes.column("phash_flip"))
    with_flip = make_stage(PhashDedupStage, tmp_path).run(table)
    uid = table.column(schema.UID).to_numpy()
    assert set(drops_by_uid(with_flip)) == {int(uid[1])}
    assert drops_by_uid(with_flip)[int(uid[1])][1]["hamming_distance"] <= 8
    assert make_stage(PhashDedupStage, tmp_path, flip=False).run(table).drops.num_rows == 0


# -- pca_hash --------------------------------------------------------------------------------
def test_pca_hash_merges_near_identical_descriptors_only(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 256)).astype(np.float32)
    copies = x[:40] + 0.01 * rng.standard_normal((40, 256)).astype(np.float32)  # re-encodes
    table = rows_table(440, pixels_descriptor=descriptor_column(np.vstack([x, copies]), pa.float32()))
    result = make_stage(PcaHashStage, tmp_path, bits=64, radius=2).run(table)
    uid = table.column(schema.UID).to_numpy()
    drops = drops_by_uid(result)
    # Each copy pairs with its original (same area: the smaller uid, the original, is kept).
    assert set(drops) == {int(u) for u in uid[400:]}
    assert all(d["kept_uid"] == int(uid[i]) for i, (_, d) in zip(range(40), (drops[int(u)] for u in uid[400:])))
    assert result.summary["bits"] == 64 and 0 < result.summary["explained_variance_ratio"] < 1


def test_pca_hash_rejects_more_bits_than_dimensions(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    table = rows_table(10, pixels_descriptor=descriptor_column(x, pa.float32()))
    with pytest.raises(ValueError, match="bits"):
        make_stage(PcaHashStage, tmp_path, bits=64).run(table)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_stage(PcaHashStage, tmp_path, bits=100)


# -- configuration ---------------------------------------------------------------------------
def test_stages_validate_from_pipeline_yaml_entries():
    cfg = PipelineConfig.model_validate(
        {
            "stages": [
                {"kind": "phash", "method": "whash"},
                {"kind": "phash_dedup", "radius": 6},
                {"kind": "pca_hash", "descriptor": "pixels_descriptor", "bits": 128},
                {"kind": "copy_dedup", "descriptor": "sscd_descriptor", "k": 64, "threshold": 0.6, "index": {"spec": "IVF1024,PQ64x4fs", "nprobe": 16}},
                {"kind": "decontaminate", "threshold": 0.45},
            ]
        }
    )
    assert [s.kind for s in cfg.stages] == ["phash", "phash_dedup", "pca_hash", "copy_dedup", "decontaminate"]
    with pytest.raises(ValueError):
        PipelineConfig.model_validate({"stages": [{"kind": "copy_dedup", "index": {"spec": "Flat", "bogus": 1}}]})


# -- grouping: star (no chaining) ------------------------------------------------------------
def chain_of_three_hashes():
    a = np.uint64(0)
    b = a ^ np.uint64(0b111)  # 3 bits from a
    c = b ^ np.uint64(0b111000)  # 3 bits from b, 6 from a
    return np.array([a, b, c], np.uint64)


@pytest.mark.parametrize("grouping, kept", [("components", {0}), ("star", {0, 2})])
def test_phash_chain_keeps_both_ends_under_star_and_one_under_components(tmp_path, grouping, kept):
    table = rows_table(3, width=[300, 200, 100], phash=pa.array(chain_of_three_hashes(), pa.uint64()))
    result = make_stage(PhashDedupStage, tmp_path, radius=3, flip=False, grouping=grouping).run(table)
    uid = table.column(schema.UID).to_numpy()
    drops = drops_by_uid(result)
    assert {i for i in range(3) if int(uid[i]) not in drops} == kept
    distances = {u: d["hamming_distance"] for u, (_, d) in drops.items()}
    assert all(d["kept_uid"] == int(uid[0]) for _, d in drops.values())
    # The distance to the image kept in its place: beyond the radius only under components.
    assert distances == ({int(uid[1]): 3, int(uid[2]): 6} if grouping == "components" else {int(uid[1]): 3})


def test_star_records_the_direct_similarity_to_its_own_representative(tmp_path):
    e = np.eye(3, 32, dtype=np.float32)
    a, c = e[0], unit(0.5 * e[0] + np.sqrt(0.75) * e[1])  # cos(a, c) = 0.5
    b = unit(a + c)  # cos(a, b) = cos(b, c) = 0.87
    x = np.vstack([a, b, c])
    for grouping, expect_kept in (("components", 1), ("star", 2)):
        table = rows_table(3, width=[300, 200, 100], sscd_descriptor=descriptor_column(x, pa.float32()))
        result = make_stage(CopyDedupStage, tmp_path, threshold=0.7, grouping=grouping).run(table)
        drops = drops_by_uid(result)
        assert 3 - len(drops) == expect_kept
        if grouping == "components":  # the paper's rule: c dropped as a copy of a at cos 0.5
            assert min(d["similarity"] for _, d in drops.values()) == pytest.approx(0.5, abs=1e-3)
        else:
            assert all(d["similarity"] > 0.7 for _, d in drops.values())
            assert result.summary["grouping"] == "star"


def test_phash_records_the_distance_through_either_mirror(tmp_path):
    h = np.array([0x0F, 0xFF00FF00FF00FF00], np.uint64)
    flip = np.array([0xFF00FF00FF00FF01, 0xAAAA], np.uint64)  # a's mirror is 1 bit from b
    table = rows_table(2, width=[300, 100], phash=pa.array(h, pa.uint64()), phash_flip=pa.array(flip, pa.uint64()))
    (_, details), = drops_by_uid(make_stage(PhashDedupStage, tmp_path, radius=6).run(table)).values()
    assert details["hamming_distance"] == 1  # the edge's distance, not hash-to-hash (far larger)
