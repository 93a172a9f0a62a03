"""A hash stage's band: pairs within ``accept_within`` bits are copies on the hash alone, pairs
farther out (up to the radius) only when local features verify them; images without features
keep the hash's verdict. Real photos, planted hash values, both execution forms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation.stages.pca_hash import PcaHashStage
from curation.stages.phash_dedup import PhashDedupConfig, PhashDedupStage
from tests.partitioned_helpers import both_forms
from tests.test_local_copy_dedup import jpeg, photos, stage_table, uid_of  # noqa: F401  (photos: fixture)

BAND = {"radius": 6, "flip": False, "band": {"accept_within": 2}}


def flipped_bits(value: int, bits: int, rng: np.random.Generator) -> int:
    for b in rng.choice(64, bits, replace=False):
        value ^= 1 << int(b)
    return value


@pytest.fixture(scope="module")
def hashed(photos):
    """Rows 0-7: unrelated photos. 8: photo 0 re-encoded at half size, its hash 4 bits away (in
    the band, verified). 9: photo 8, unrelated to photo 3 but its hash 5 bits from it (in the
    band, rejected). 10: photo 4 resized, 1 bit away (accepted on the hash). 11, 12: two blank
    images 3 bits apart (no keypoints: accepted on the hash)."""
    blank = Image.new("RGB", (320, 240), (128, 128, 128))
    blobs = [jpeg(p) for p in photos[:8]]
    blobs += [jpeg(photos[0].resize((photos[0].width // 2, photos[0].height // 2)), 40), jpeg(photos[8]),
              jpeg(photos[4].resize((photos[4].width * 3 // 4, photos[4].height * 3 // 4))), jpeg(blank), jpeg(blank.resize((200, 150)))]
    rng = np.random.default_rng(5)
    values = [int(v) for v in rng.integers(0, 2**63, 8)] + [0] * 5
    values[8], values[9], values[10] = flipped_bits(values[0], 4, rng), flipped_bits(values[3], 5, rng), flipped_bits(values[4], 1, rng)
    values[11] = int(rng.integers(0, 2**63))
    values[12] = flipped_bits(values[11], 3, rng)
    table = stage_table(blobs)
    return table.append_column("phash", pa.array(np.array(values, np.uint64)))


@pytest.mark.parametrize("grouping", ["components", "star"])
def test_phash_band_verifies_far_pairs_and_keeps_look_alikes_in_both_forms(tmp_path, hashed, grouping):
    (single, d1, l1), (parted, d2, l2) = both_forms(tmp_path, hashed, PhashDedupStage, {**BAND, "grouping": grouping}, shard_rows=4,
                                                    max_partition_rows=2000, map_task_rows=5)
    assert parted["execution"] == "partitioned" and d1.equals(d2) and l1.equals(l2)
    uid = lambda row: uid_of(row, 4)  # noqa: E731
    details = {u: json.loads(d) for u, d in zip(d1.column("uid").to_pylist(), d1.column("drop_details").to_pylist())}
    assert sorted(details) == sorted([uid(8), uid(10), uid(12)])  # the look-alike (row 9) stays
    assert details[uid(8)]["kept_uid"] == uid(0) and details[uid(8)]["hamming_distance"] == 4
    assert details[uid(8)]["evidence"] == "geometric" and details[uid(8)]["geometry"]["inliers"] >= 12
    assert details[uid(10)]["kept_uid"] == uid(4) and details[uid(10)]["evidence"] == "hash"
    assert details[uid(12)]["kept_uid"] == uid(11) and details[uid(12)]["evidence"] == "hash_without_features"
    for s in (single["summary"], parted["summary"]):
        assert (s["verified_pairs"], s["edges_geometric"], s["edges_hash"], s["edges_without_features"]) == (3, 1, 1, 1), s
        assert sum(s["rejected"].values()) == 1 and s["accept_within"] == 2


def test_without_the_band_the_look_alike_is_dropped(tmp_path, hashed):
    (_, drops, _), _ = both_forms(tmp_path, hashed, PhashDedupStage, {"radius": 6, "flip": False}, shard_rows=4)
    assert uid_of(9, 4) in drops.column("uid").to_pylist()


def test_rejecting_pairs_without_features_keeps_the_blank_images(tmp_path, hashed):
    config = {**BAND, "band": {"accept_within": 2, "without_features": "reject"}}
    (single, drops, _), (_, d2, _) = both_forms(tmp_path, hashed, PhashDedupStage, config, shard_rows=4, max_partition_rows=2000)
    assert drops.equals(d2) and sorted(drops.column("uid").to_pylist()) == sorted([uid_of(8, 4), uid_of(10, 4)])
    assert single["summary"]["rejected"].get("no_features") == 1


def test_a_band_must_leave_pairs_to_verify():
    with pytest.raises(ValueError, match="accept_within"):
        PhashDedupConfig(kind="phash_dedup", radius=4, band={"accept_within": 4})


def test_pca_hash_band_without_features_keeps_the_hash_verdict_in_both_forms(tmp_path):
    """No image has features: with ``accept`` the band changes nothing, with ``reject`` only
    equal codes (0 bits) link; both forms agree on each."""
    from tests.test_partitioned import fixed_list, planted_groups, sizes

    planted = planted_groups(600, 64, copy_noise=0.03, seed=4)
    table = pa.table({"pixels_descriptor": fixed_list(planted.x), **sizes(600, 4),
                      "local_features": pa.nulls(600, pa.struct([pa.field("width", pa.int32())]))})
    plain = {"radius": 4}
    (_, base, _), _ = both_forms(tmp_path / "plain", table, PcaHashStage, plain, shard_rows=100)
    (_, accepted, _), (_, accepted2, _) = both_forms(tmp_path / "accept", table, PcaHashStage, {**plain, "band": {"accept_within": 0}},
                                                     shard_rows=100, max_partition_rows=300)
    assert accepted.column("uid").equals(base.column("uid")) and accepted.equals(accepted2)
    (s, rejected, _), (_, rejected2, _) = both_forms(tmp_path / "reject", table, PcaHashStage,
                                                     {**plain, "band": {"accept_within": 0, "without_features": "reject"}},
                                                     shard_rows=100, max_partition_rows=300)
    assert rejected.equals(rejected2) and rejected.num_rows < base.num_rows
    assert s["summary"]["edges_geometric"] == 0 and s["summary"]["rejected"]["no_features"] > 0


def test_a_band_listed_before_its_local_features_is_refused_before_any_work(tmp_path):
    """The offline pipeline with ``local_features`` moved after ``phash_dedup``: the run is
    refused on the driver, naming the column and the stage to move (every bundled pipeline
    passes the same check)."""
    import yaml

    from curation.config import load_config
    from curation.ingest.rows import ingest_columns
    from curation.stage import StageContext, StageError, check_column_order, stage_class

    def stages_of(path):
        cfg = load_config(path)
        return [stage_class(sc.kind)(sc, StageContext(tmp_path, tmp_path)) for sc in cfg.enabled_stages()], cfg

    project = Path(__file__).resolve().parents[1] / "pipelines"
    for name in ("lvd", "offline", "demo", "smoke"):
        stages, cfg = stages_of(project / f"{name}.yaml")
        check_column_order(stages, ingest_columns(cfg.ingest))
    spec = yaml.safe_load((project / "offline.yaml").read_text())
    features = next(s for s in spec["stages"] if s["kind"] == "local_features")
    spec["stages"].remove(features)
    spec["stages"].insert(next(i for i, s in enumerate(spec["stages"]) if s["kind"] == "local_copy_dedup"), features)
    (tmp_path / "late.yaml").write_text(yaml.safe_dump(spec))
    stages, cfg = stages_of(tmp_path / "late.yaml")
    with pytest.raises(StageError, match="'phash_dedup' reads column 'local_features'.*list it before 'phash_dedup'"):
        check_column_order(stages, ingest_columns(cfg.ingest))
