"""Model weights: every file a pipeline can load, one cache for them, and the check a run makes
before any work.

The cache is one directory, ``$CURATION_MODELS`` (default ``~/.cache/curation/models``): flat
files for the NSFW and SSCD weights, ``timm/<model>/<file>`` for timm models. Loaders look there
first and then where their libraries look (opennsfw2's ``~/.opennsfw2``, the Hugging Face and
torch hub caches), so weights copied by hand keep working.

Each stage config says what it loads (``StageConfig.model_needs()``), so the needs of a pipeline
come from its stages. :func:`check_pipeline` reports every missing file at once, with the fetch
command and the offline alternative, before a run starts.

Checksums: a registry entry pins a sha256 only where upstream publishes one. None of the
current upstreams do (the opennsfw2 release, SSCD's dl.fbaipublicfiles.com files, timm's
weights), so their entries carry none and ``curate models fetch`` refuses them unless given
``--trust-on-first-use``: the sha256 of that first download is then recorded in
``checksums.json`` in the cache, enforced on any re-fetch and checked by ``curate models verify``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from curation.config import PipelineConfig

CACHE_ENV = "CURATION_MODELS"
# A server holding the cache layout (``<mirror>/<entry.file>``), e.g. an internal mirror.
MIRROR_ENV = "CURATION_MODELS_MIRROR"
CHECKSUMS_FILE = "checksums.json"

SSCD_FILES = {
    "sscd_disc_mixup": "ResNet-50, DISC, advanced + mixup augmentations, 512-d (the SSCD authors' default)",
    "sscd_disc_large": "ResNeXt101 32x4, DISC, advanced + mixup, 1024-d (more accurate, slower)",
    "sscd_disc_advanced": "ResNet-50, DISC, advanced augmentations, 512-d",
    "sscd_disc_blur": "ResNet-50, DISC, strong blur, 512-d",
    "sscd_imagenet_mixup": "ResNet-50, ImageNet, advanced + mixup, 512-d",
    "sscd_imagenet_advanced": "ResNet-50, ImageNet, advanced augmentations, 512-d",
    "sscd_imagenet_blur": "ResNet-50, ImageNet, strong blur, 512-d",
}


class WeightsError(RuntimeError):
    """Weights that a run or a ``curate models`` command needs and cannot use; says how to fix it."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curation" / "models").expanduser()


@dataclass(frozen=True)
class ModelEntry:
    """One file `curate models fetch` knows how to install."""

    name: str  # what you type: opennsfw2, sscd_disc_mixup, timm/<model name>
    file: str  # its place under cache_dir()
    url: str
    sha256: str | None  # pinned; None: upstream publishes no checksum
    description: str

    @property
    def path(self) -> Path:
        return cache_dir() / self.file

    def source_url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV)
        return f"{mirror.rstrip('/')}/{self.file}" if mirror else self.url


@lru_cache(maxsize=1)
def static_entries() -> dict[str, ModelEntry]:
    from curation.safety.opennsfw2_backend import WEIGHTS_FILE, WEIGHTS_URL
    from embedders.sscd import SSCD_DOWNLOAD

    entries = [ModelEntry("opennsfw2", WEIGHTS_FILE, WEIGHTS_URL, None, "Yahoo Open-NSFW weights as opennsfw2 publishes them (nsfw stage)")]
    for name, what in SSCD_FILES.items():
        file = f"{name}.torchscript.pt"
        entries.append(ModelEntry(name, file, SSCD_DOWNLOAD.format(file=file), None, f"SSCD TorchScript: {what}"))
    return {e.name: e for e in entries}


def timm_entry(model: str) -> ModelEntry | None:
    """The weights timm would download for ``model`` (its pretrained config), or None."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        fname = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{fname}"
    elif cfg.url:
        url, fname = cfg.url, os.path.basename(cfg.url)
    else:
        return None
    return ModelEntry(f"timm/{model}", f"timm/{model}/{fname}", url, None, f"timm pretrained weights of {model}")


def entry(name: str) -> ModelEntry:
    found = static_entries().get(name)
    if found is None and name.startswith("timm/"):
        found = timm_entry(name.removeprefix("timm/"))
    if found is None:
        raise WeightsError(f"no model named {name!r}; known: {', '.join(static_entries())}, or timm/<timm model name>")
    return found


def installed_timm_entries() -> list[ModelEntry]:
    root = cache_dir() / "timm"
    found = [timm_entry(d.name) for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    return [e for e in found if e is not None]


# -- what a pipeline needs ---------------------------------------------------------------------
@dataclass
class ModelNeed:
    """A model file one stage loads, and whether it is there."""

    stage: str
    model: str
    path: Path | None  # the file that will be loaded (None: a library decides, e.g. a bundled model)
    entry: str | None  # the registry name that `curate models fetch` installs, if any
    problem: str | None  # why it cannot be loaded now; None when present
    offline: str = ""  # how to provide it without network on this machine
    skippable: bool = False  # the stage runs NOT applied when it is missing (e.g. nsfw `if_missing: skip`)

    @property
    def present(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path) if self.path else None, "present": self.present}


def pipeline_needs(cfg: "PipelineConfig") -> list[ModelNeed]:
    return [need for sc in cfg.enabled_stages() for need in sc.model_needs()]


def _copy_hint(e: ModelEntry, dest: Path) -> str:
    return f"download {e.url} on a connected machine and copy it to {dest}"


def nsfw_weights_path(backend_cls, configured: Path | None) -> Path:
    """``weights:`` when set; else the cache, or the backend library's own place if the file is
    only there; a file in neither place is expected in the cache (where fetch puts it)."""
    if configured is not None:
        return Path(configured).expanduser()
    e = static_entries().get(backend_cls.name)
    candidates = ([e.path] if e else []) + [backend_cls.default_weights_path()]
    return next((p for p in candidates if p.exists()), candidates[0])


def nsfw_need(stage: str, backend_cls, configured: Path | None) -> ModelNeed:
    path = nsfw_weights_path(backend_cls, configured)
    e = static_entries().get(backend_cls.name) if configured is None else None
    problem = backend_cls.weights_problem(path)
    if problem and configured is None and path != backend_cls.default_weights_path():
        problem += f" (nor at {backend_cls.default_weights_path()}, where {backend_cls.name} itself looks)"
    offline = _copy_hint(e, path) if e else f"{backend_cls.download_hint()} and put it at {path}"
    return ModelNeed(stage, f"{backend_cls.name} NSFW weights", path, e.name if e else None, problem, offline)


def embedder_needs(stage: str, spec) -> list[ModelNeed]:
    """What an embedder spec (embedders.registry) loads: an SSCD file, a timm checkpoint or
    timm's pretrained weights; pixel descriptors load nothing."""
    kind = getattr(spec, "type", None)
    if kind == "sscd":
        from embedders.sscd import resolve_sscd_path

        path = resolve_sscd_path(spec.path)
        e = next((x for x in static_entries().values() if path == x.path), None)
        problem = None if path.is_file() else f"no SSCD TorchScript file at {path}"
        offline = _copy_hint(e, path) if e else f"copy your TorchScript file to {path}"
        return [ModelNeed(stage, f"SSCD {path.name}", path, e.name if e else None, problem, offline)]
    if kind != "timm" or not (spec.checkpoint or spec.pretrained):
        return []
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        problem = None if path.is_file() else f"checkpoint file {path} does not exist"
        return [ModelNeed(stage, f"timm checkpoint {path.name}", path, None, problem, f"copy the checkpoint to {path}")]
    from embedders.timm_model import weights_cached

    e = timm_entry(spec.name)
    if e is None:
        return [ModelNeed(stage, f"timm {spec.name}", None, None, f"timm has no pretrained weights registered for {spec.name!r}", "")]
    problem = None if weights_cached(spec.name) else f"pretrained weights of timm model {spec.name!r} are neither at {e.path} nor in the Hugging Face / torch hub caches"
    offline = f"{_copy_hint(e, e.path)} (or into the Hugging Face / torch hub cache, where timm looks too)"
    return [ModelNeed(stage, f"timm {spec.name}", e.path, e.name, problem, offline)]


def bundled_need(stage: str, package: str, model: str, files: tuple[str, ...]) -> ModelNeed:
    """Weights shipped inside a pip package (found without importing it)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ModelNeed(stage, model, None, None, f"the {package} package is not installed", f"pip install --no-deps {package}")
    root = Path(list(spec.submodule_search_locations)[0])
    missing = [f for f in files if not (root / f).is_file()]
    problem = f"{package} lacks {', '.join(missing)} (reinstall it)" if missing else None
    return ModelNeed(stage, f"{model} (bundled with {package})", root / Path(files[0]).parent, None, problem, f"pip install --force-reinstall --no-deps {package}")


# -- checksums recorded on first use -----------------------------------------------------------
def _checksums_path() -> Path:
    return cache_dir() / CHECKSUMS_FILE


def recorded_checksums() -> dict[str, dict[str, Any]]:
    p = _checksums_path()
    return json.loads(p.read_text()) if p.is_file() else {}


def record_checksum(e: ModelEntry, digest: str, url: str) -> None:
    records = recorded_checksums()
    records[e.file] = {"sha256": digest, "url": url, "pinned": e.sha256 is not None, "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    p = _checksums_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
    tmp.replace(p)


def expected_sha256(e: ModelEntry) -> str | None:
    """The pinned checksum, else the one recorded at the first trusted download."""
    return e.sha256 or (recorded_checksums().get(e.file) or {}).get("sha256")


# -- the check before a run --------------------------------------------------------------------
def check_pipeline(
    cfg: "PipelineConfig", *, allow_missing: bool = False, fetch: bool = False, trust_on_first_use: bool = False,
    seeds: bool = False, progress: bool = True,
) -> list[str]:
    """Check every model file the pipeline loads before any work; call it before ``run_pipeline``.

    Missing files are fetched first when asked (``fetch`` or ``models.auto_fetch`` in the YAML)
    and the network is reachable. Returns lines to show the user (what was fetched, which stages
    will run NOT applied under ``allow_missing``); raises ``WeightsError`` naming every missing
    file with the fetch command and the offline alternative. ``seeds`` says whether the run has
    seed datasets (retrieval without its embeddings would then drop the whole pool)."""
    notes: list[str] = []
    missing = [n for n in pipeline_needs(cfg) if not n.present]
    if missing and (fetch or cfg.models.auto_fetch):
        notes += fetch_missing(missing, trust_on_first_use or cfg.models.trust_on_first_use, progress)
        missing = [n for n in pipeline_needs(cfg) if not n.present]
    if not missing:
        return notes
    skipped = [n for n in missing if n.skippable]
    notes += [f"stage {n.stage!r} will run NOT applied (its config says so when weights are missing): {n.problem}" for n in skipped]
    missing = [n for n in missing if not n.skippable]
    if not missing:
        return notes
    blocked: list[str] = []
    not_applied: list[str] = []
    for n in missing:
        readers = downstream_readers(cfg, n.stage)
        if seeds and any(r.kind == "retrieve" for r in readers):
            blocked.append(
                f"--allow-missing-weights cannot skip stage {n.stage!r}: retrieve reads its output and would drop every pool "
                f"image as not_retrieved; provide the weights, or disable retrieval (--set stages.retrieve.enabled=false)"
            )
        later = f"; {', '.join(r.stage_name for r in readers)} then find no value in its column and remove nothing" if readers else ""
        not_applied.append(f"stage {n.stage!r} will run NOT applied: {n.problem}{later}")
    if allow_missing and not blocked:
        return notes + not_applied
    raise WeightsError(missing_report(missing, notes, blocked if allow_missing else []))


def fetch_missing(missing: list[ModelNeed], trust_on_first_use: bool, progress: bool = True) -> list[str]:
    from curation.model_fetch import NetworkUnreachable, fetch

    notes = []
    for name in sorted({n.entry for n in missing if n.entry}):
        try:
            got = fetch(entry(name), trust_on_first_use=trust_on_first_use, progress=progress)
            notes.append(f"fetched {name} into {got.entry.path} (sha256 {got.sha256})")
        except NetworkUnreachable as e:
            notes.append(f"automatic fetch stopped, the network is not reachable: {e}")
            break
        except WeightsError as e:
            notes.append(f"automatic fetch of {name} failed: {e}")
    return notes


def downstream_readers(cfg: "PipelineConfig", stage_name: str) -> list:
    """Later stages that read the column a stage writes (a string option naming it)."""
    stages = cfg.enabled_stages()
    idx = next((i for i, s in enumerate(stages) if s.stage_name == stage_name), None)
    column = getattr(stages[idx], "column", None) if idx is not None else None
    if not isinstance(column, str):
        return []
    return [s for s in stages[idx + 1 :] if column in {v for v in s.model_dump().values() if isinstance(v, str)}]


def missing_report(missing: list[ModelNeed], notes: list[str], blocked: list[str]) -> str:
    lines = [f"{len(missing)} model file(s) this pipeline needs cannot be loaded:"]
    lines += [f"  stage {n.stage!r}: {n.model}: {n.problem}" for n in missing]
    lines += [f"  ({note})" for note in notes]
    names = sorted({n.entry for n in missing if n.entry})
    if names:
        unpinned = [x for x in names if expected_sha256(entry(x)) is None]
        tofu = " --trust-on-first-use" if unpinned else ""
        lines.append(f"Fetch them into the cache {cache_dir()} (${CACHE_ENV} moves it):")
        lines.append(f"  curate models fetch {' '.join(names)}{tofu}")
        if unpinned:
            lines.append(f"  (--trust-on-first-use: upstream publishes no checksum for {', '.join(unpinned)}; the first download's sha256 is recorded)")
        lines.append("  or add --fetch-weights to this command")
    lines.append("Offline: run that fetch on a connected machine with CURATION_MODELS=/some/dir and copy the folder here; or file by file:")
    lines += [f"  stage {n.stage!r}: {n.offline}" for n in missing if n.offline]
    lines.append(
        "Or run without them: --allow-missing-weights runs these stages NOT applied (the manifest and summary say so), "
        "or disable a stage with --set stages.NAME.enabled=false."
    )
    from curation.stage import WEIGHT_FREE_HINT

    lines.append(WEIGHT_FREE_HINT)
    lines += blocked
    return "\n".join(lines)
