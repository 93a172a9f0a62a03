"""The weight-free pipeline runs with no downloaded weights, and the default pipeline's refusal
to run without them points to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.config import load_config
from curation.stage import StageContext, StageError, stage_class


def stages_of(name: str, tmp_path: Path, allow_missing_weights: bool = False):
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path, allow_missing_weights=allow_missing_weights)
    return [stage_class(sc.kind)(sc, ctx) for sc in load_config(name).enabled_stages()]


def test_offline_needs_no_weights_and_says_nsfw_was_not_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no opennsfw2 weights under ~/.opennsfw2
    stages = stages_of("offline", tmp_path)
    warnings = [w for s in stages for w in s.preflight()]
    assert any("NSFW filtering was NOT applied" in w and "if_missing: skip" in w for w in warnings)
    nsfw = next(s for s in stages if s.config.kind == "nsfw")
    assert nsfw.manifest_section()["applied"] is False
    kinds = [s.config.kind for s in stages]
    assert kinds.index("phash_dedup") < kinds.index("local_copy_dedup") and "face_blur" in kinds
    assert "retrieve" not in kinds  # a retrieval embedding needs trained weights


def test_lvd_refusal_without_weights_points_to_the_offline_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(StageError, match="--config offline"):
        for s in stages_of("lvd", tmp_path):
            s.preflight()


def test_demo_runs_the_offline_dedup_and_safety_stages():
    offline = [s.kind for s in load_config("offline").enabled_stages()]
    demo = [s.kind for s in load_config("demo").enabled_stages()]
    assert [k for k in demo if k not in ("embed", "retrieve")] == [k for k in offline if k != "embed"]


def test_the_weights_check_before_a_run_lets_offline_through_and_sends_lvd_there(tmp_path, monkeypatch):
    from curation.models import CACHE_ENV, WeightsError, check_pipeline

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "models"))
    notes = check_pipeline(load_config("offline"), progress=False)
    assert any("'nsfw' will run NOT applied" in n for n in notes)
    with pytest.raises(WeightsError, match="--config offline"):
        check_pipeline(load_config("lvd"), progress=False)
