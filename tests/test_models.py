"""Model weights: the registry, `curate models list | fetch | verify`, and the check before a run.

Weights come from a real HTTP server on 127.0.0.1 (``WeightsServer``) that serves fake weight
files with Range support, a corrupt copy of a file, and a transfer that breaks off halfway; the
cache is a temporary ``$CURATION_MODELS`` and the server stands in as ``$CURATION_MODELS_MIRROR``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curation import models
from curation.cli import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, main
from curation.config import PipelineConfig
from curation.model_fetch import ChecksumMismatch, DownloadError, NetworkUnreachable, download, fetch, verify

HDF5 = b"\x89HDF\r\n\x1a\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class WeightsServer:
    """Serves ``files`` (path -> bytes). ``break_once`` paths send a full Content-Length but
    only half the body on their first request; ``ignore_range`` paths answer a Range request
    with the whole file (200). Records every request's Range header."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.break_once: set[str] = set()
        self.ignore_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((path, rng))
                body = outer.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and path not in outer.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in outer.break_once:
                    outer.break_once.discard(path)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def hits(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


GOOD = HDF5 + bytes(range(256)) * 4000  # ~1 MB, more than one read chunk
SSCD_BYTES = b"torchscript-ish " * 70000


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(d))
    monkeypatch.setenv("OPENNSFW2_HOME", str(tmp_path / "nsfw-home"))  # opennsfw2's own place: empty
    return d


@pytest.fixture
def server(monkeypatch):
    with WeightsServer({"open_nsfw_weights.h5": GOOD, "sscd_disc_mixup.torchscript.pt": SSCD_BYTES}) as s:
        monkeypatch.setenv(models.MIRROR_ENV, s.base)
        yield s


def pinned(name: str, digest: str) -> models.ModelEntry:
    return replace(models.entry(name), sha256=digest)


# -- downloads -------------------------------------------------------------------------------
def test_a_good_file_is_installed_verified_and_not_fetched_twice(cache, server):
    e = pinned("opennsfw2", sha(GOOD))
    got = fetch(e, progress=False)
    assert got.status == "fetched" and e.path.read_bytes() == GOOD and got.sha256 == sha(GOOD)
    assert not list(cache.glob("*.partial"))
    assert verify(e) == ("ok", f"sha256 {sha(GOOD)}")
    assert fetch(e, progress=False).status == "present"
    assert server.hits("open_nsfw_weights.h5") == [None]  # one request, no Range


def test_a_corrupt_file_is_refused_and_nothing_is_installed(cache, server):
    server.files["open_nsfw_weights.h5"] = GOOD[:-1] + b"X"
    e = pinned("opennsfw2", sha(GOOD))
    with pytest.raises(ChecksumMismatch, match="nothing was installed"):
        fetch(e, progress=False)
    assert not e.path.exists() and not list(cache.rglob("*.partial"))


def test_an_interrupted_download_resumes_with_a_range_request(cache, server):
    server.break_once.add("sscd_disc_mixup.torchscript.pt")
    e = pinned("sscd_disc_mixup", sha(SSCD_BYTES))
    with pytest.raises(DownloadError, match="run the command again to resume"):
        fetch(e, progress=False)
    part = e.path.with_name(e.path.name + ".partial")
    half = len(SSCD_BYTES) // 2
    assert not e.path.exists() and part.stat().st_size == half
    got = fetch(e, progress=False)
    assert got.status == "fetched" and e.path.read_bytes() == SSCD_BYTES and not part.exists()
    assert server.hits("sscd_disc_mixup.torchscript.pt") == [None, f"bytes={half}-"]


def test_a_server_that_ignores_the_range_restarts_the_file(cache, server, tmp_path):
    server.ignore_range.add("sscd_disc_mixup.torchscript.pt")
    dest = tmp_path / "x" / "sscd.pt"
    dest.parent.mkdir()
    dest.with_name("sscd.pt.partial").write_bytes(b"garbage from an older attempt")
    digest = download(f"{server.base}/sscd_disc_mixup.torchscript.pt", dest, sha(SSCD_BYTES), progress=False)
    assert digest == sha(SSCD_BYTES) and dest.read_bytes() == SSCD_BYTES


def test_unreachable_and_missing_files_are_told_apart(cache, tmp_path):
    with pytest.raises(NetworkUnreachable):
        download("http://127.0.0.1:9/none", tmp_path / "f", None, progress=False, timeout=5)
    with WeightsServer({}) as s:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(f"{s.base}/none", tmp_path / "f", None, progress=False)


def test_an_unpinned_file_needs_trust_on_first_use_and_is_then_held_to_it(cache, server):
    e = models.entry("sscd_disc_mixup")
    assert e.sha256 is None  # SSCD's upstream publishes no checksum
    with pytest.raises(models.WeightsError, match="--trust-on-first-use"):
        fetch(e, progress=False)
    assert server.requests == []  # refused before any download
    fetch(e, trust_on_first_use=True, progress=False)
    record = json.loads((cache / models.CHECKSUMS_FILE).read_text())[e.file]
    assert record["sha256"] == sha(SSCD_BYTES) and record["pinned"] is False
    assert verify(e)[0] == "ok"
    e.path.write_bytes(b"tampered")
    assert verify(e)[0] == "mismatch"
    with pytest.raises(ChecksumMismatch, match="delete it to fetch it again"):
        fetch(e, progress=False)
    # the recorded checksum binds later downloads too
    e.path.unlink()
    server.files[e.file] = b"a different file"
    with pytest.raises(ChecksumMismatch):
        fetch(e, trust_on_first_use=True, progress=False)


# -- what a pipeline needs ------------------------------------------------------------------
def pipeline(**extra) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "stages": [
                {"kind": "decode"},
                {"kind": "nsfw"},
                {"kind": "embed", "name": "sscd", "model": {"type": "sscd"}, "column": "sscd_descriptor"},
                {"kind": "copy_dedup", "descriptor": "sscd_descriptor"},
                {"kind": "face_blur"},
                {"kind": "embed", "model": {"type": "timm", "name": "test_vit.r160_in1k"}},
                {"kind": "embed", "name": "pixels", "model": {"type": "pixels"}, "column": "pixels"},
                {"kind": "retrieve"},
            ],
            **extra,
        }
    )


def test_every_missing_file_is_reported_at_once_with_the_fetch_command_and_the_offline_way(cache):
    needs = {n.stage: n for n in models.pipeline_needs(pipeline())}
    assert set(needs) == {"nsfw", "sscd", "face_blur", "embed"}  # pixel descriptors load nothing
    assert needs["face_blur"].present and "facenet_pytorch" in needs["face_blur"].model
    assert needs["nsfw"].path == cache / "open_nsfw_weights.h5" and needs["nsfw"].entry == "opennsfw2"
    assert needs["embed"].path == cache / "timm" / "test_vit.r160_in1k" / "model.safetensors"
    with pytest.raises(models.WeightsError) as err:
        models.check_pipeline(pipeline())
    msg = str(err.value)
    assert msg.startswith("3 model file(s) this pipeline needs cannot be loaded:")
    for stage in ("'nsfw'", "'sscd'", "'embed'"):
        assert msg.count(f"stage {stage}") == 2, stage  # the problem and the offline way
    assert "curate models fetch opennsfw2 sscd_disc_mixup timm/test_vit.r160_in1k --trust-on-first-use" in msg
    assert "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt" in msg
    assert "--allow-missing-weights" in msg and "--fetch-weights" in msg


def test_allow_missing_weights_covers_every_model_stage_but_not_retrieval_from_seeds(cache):
    notes = models.check_pipeline(pipeline(), allow_missing=True)
    assert len(notes) == 3 and all("will run NOT applied" in n for n in notes)
    assert any("'sscd'" in n and "copy_dedup then find no value" in n for n in notes)
    with pytest.raises(models.WeightsError, match="cannot skip stage 'embed': retrieve reads its output"):
        models.check_pipeline(pipeline(), allow_missing=True, seeds=True)


def test_opted_in_runs_fetch_what_is_missing_and_fall_back_when_offline(cache, server, monkeypatch):
    cfg = PipelineConfig.model_validate({"stages": [{"kind": "nsfw"}, {"kind": "embed", "model": {"type": "sscd"}}], "models": {"auto_fetch": True}})
    with pytest.raises(models.WeightsError, match="automatic fetch of opennsfw2 failed: .*--trust-on-first-use"):
        models.check_pipeline(cfg, progress=False)
    cfg.models.trust_on_first_use = True
    notes = models.check_pipeline(cfg, progress=False)
    assert sorted(n.split(" into ")[0] for n in notes) == ["fetched opennsfw2", "fetched sscd_disc_mixup"]
    assert all(n.present for n in models.pipeline_needs(cfg))
    # offline: the check says so and reports the missing files as usual
    for f in cache.iterdir():
        f.unlink()
    monkeypatch.setenv(models.MIRROR_ENV, "http://127.0.0.1:9")
    with pytest.raises(models.WeightsError, match=r"(?s)network is not reachable.*curate models fetch"):
        models.check_pipeline(cfg, progress=False)


def test_timm_weights_fetched_into_the_cache_are_the_ones_the_embedder_loads(cache, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    from embedders import build_embedder, check_available

    name = "test_vit.r160_in1k"
    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    blob_path = cache.parent / "served.safetensors"
    save_file(state, str(blob_path))
    spec = {"type": "timm", "name": name}
    with WeightsServer({f"timm/{name}/model.safetensors": blob_path.read_bytes()}) as s:
        monkeypatch.setenv(models.MIRROR_ENV, s.base)
        assert main(["models", "fetch", f"timm/{name}", "--trust-on-first-use", "--no-progress"]) == EXIT_OK
    check_available(spec)
    emb = build_embedder(spec)
    loaded = emb.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)  # the served weights, not an initialisation


# -- the commands ----------------------------------------------------------------------------
def write_pipeline(tmp_path: Path) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text("stages:\n  - {kind: decode}\n  - {kind: nsfw}\n  - {kind: embed, name: sscd, model: {type: sscd}, column: sscd_descriptor}\n")
    return p


def listed(capsys, *args) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["models", "list", *args, "--json"]) == EXIT_OK
    return {n["stage"]: n for n in json.loads(capsys.readouterr().out)["needs"]}


def test_list_fetch_verify_from_the_command_line(cache, server, tmp_path, capsys):
    cfg = str(write_pipeline(tmp_path))
    before = listed(capsys, "--config", cfg)
    assert {k: v["present"] for k, v in before.items()} == {"nsfw": False, "sscd": False}
    assert before["sscd"]["path"] == str(cache / "sscd_disc_mixup.torchscript.pt")
    assert main(["models", "fetch", "--config", cfg, "--no-progress"]) == EXIT_REFUSED  # unpinned upstreams
    assert "--trust-on-first-use" in capsys.readouterr().err and server.requests == []
    assert main(["models", "fetch", "--config", cfg, "--trust-on-first-use", "--no-progress"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "fetched: opennsfw2" in out and "fetched: sscd_disc_mixup" in out
    assert all(v["present"] for v in listed(capsys, "--config", cfg).values())
    assert main(["models", "verify", "--config", cfg]) == EXIT_OK
    assert capsys.readouterr().out.count("ok ") == 2
    (cache / "sscd_disc_mixup.torchscript.pt").write_bytes(b"tampered")
    assert main(["models", "verify", "--config", cfg]) == EXIT_FAILED
    assert "mismatch  sscd_disc_mixup" in capsys.readouterr().out
    assert main(["models", "fetch", "no-such-model"]) == EXIT_REFUSED
    assert "no model named 'no-such-model'" in capsys.readouterr().err


def test_a_broken_download_fails_the_fetch_command_and_the_next_one_resumes(cache, server, capsys):
    server.break_once.add("open_nsfw_weights.h5")
    assert main(["models", "fetch", "opennsfw2", "--trust-on-first-use", "--no-progress"]) == EXIT_FAILED
    assert "resume" in capsys.readouterr().err
    assert main(["models", "fetch", "opennsfw2", "--trust-on-first-use", "--no-progress"]) == EXIT_OK
    assert (cache / "open_nsfw_weights.h5").read_bytes() == GOOD
    assert server.hits("open_nsfw_weights.h5")[1] == f"bytes={len(GOOD) // 2}-"


def test_curate_run_refuses_before_any_work_listing_every_missing_file(cache, tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    out = tmp_path / "run"
    rc = main(["run", "--pool", str(pool), "--config", str(write_pipeline(tmp_path)), "--out", str(out)])
    assert rc == EXIT_REFUSED and not out.exists()
    err = capsys.readouterr().err
    assert "2 model file(s)" in err and "stage 'nsfw'" in err and "stage 'sscd'" in err
    assert "curate models fetch opennsfw2 sscd_disc_mixup --trust-on-first-use" in err


def test_allow_missing_weights_runs_every_model_stage_not_applied_and_says_so(cache, tmp_path, jpeg_factory, ray_local, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(5):
        (pool / f"{i}.jpg").write_bytes(jpeg_factory(i))
    (pool / "copy.jpg").write_bytes(jpeg_factory(0, quality=70))  # a near copy SSCD would have removed
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "ingest: {shard_size: 4}\nstages:\n  - {kind: decode, min_side: 32}\n  - {kind: nsfw}\n"
        "  - {kind: embed, name: sscd, model: {type: sscd}, column: sscd_descriptor, cpus_per_worker: 1}\n"
        "  - {kind: copy_dedup, descriptor: sscd_descriptor}\nray: {num_cpus: 2, include_dashboard: false}\n"
    )
    out = tmp_path / "run"
    assert main(["run", "--pool", str(pool), "--config", str(cfg), "--out", str(out), "--allow-missing-weights"]) == EXIT_OK
    captured = capsys.readouterr()
    assert captured.err.count("WARNING: stage") == 2  # said before the run starts ...
    assert captured.out.count("NOT APPLIED") == 2  # ... and in the summary table
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage_reports"]["nsfw"]["applied"] is False and m["stage_reports"]["sscd"]["applied"] is False
    assert m["stage_reports"]["sscd"]["dim"] == 512
    assert any(w.startswith("embedding stage 'sscd' (column 'sscd_descriptor') was NOT applied") for w in m["warnings"])
    assert m["counts"]["kept"] == 6 and m["counts"]["dropped"] == {}
    copy = next(s for s in m["stages"] if s["stage"] == "copy_dedup")
    assert copy["in"] == copy["out"] == 6
