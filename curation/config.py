"""Pipeline configuration: pydantic models loaded from YAML, with readable errors.

A pipeline file (``pipelines/lvd.yaml``) holds run settings, ingestion settings, the ordered
list of stages, and the seed / evaluation-set catalogs. Stage entries are validated by the
``Config`` model of the stage module their ``kind`` names.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

import pipelines
from curation.stage import StageConfig, StageError, stage_class

PIPELINES_DIR = pipelines.DIR


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpConfig(Strict):
    """Crawler settings for URL lists."""

    concurrency: int = Field(64, ge=1, description="requests in flight in one ingest worker")
    per_host: int = Field(8, ge=1, description="requests in flight to one host")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=0, description="retries after a 5xx, 429 or timeout")
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds, doubled each retry")
    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="larger bodies are dropped as too_large")
    max_redirects: int = Field(5, ge=0)
    user_agent: str = "curation/0.1 (+https://github.com/curation)"
    allow_private_addresses: bool = Field(
        False,
        description="fetch loopback, private, link-local and other non-public addresses (off: such URLs are blocked_address)",
    )
    allowed_networks: list[str] = Field(
        default_factory=list, description="networks fetched although not public, e.g. an internal mirror: ['10.1.2.0/24']"
    )
    robots_opt_out: bool = Field(True, description="honour X-Robots-Tag opt-outs (drops: robots_opt_out)")
    robots_opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai"], description="X-Robots-Tag directives that opt an image out"
    )

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"not a network: {net!r} ({e})") from None
        return value


class UrlRulesConfig(Strict):
    """Blocklists applied to URLs at ingestion (drops: blocked_domain / blocked_url)."""

    domain_files: list[Path] = Field(default_factory=list, description="files of blocked domains, one per line; subdomains are blocked too")
    domains: list[str] = Field(default_factory=list)
    suffixes: list[str] = Field(default_factory=list, description="blocked host suffixes, e.g. '.xxx'")
    regex_files: list[Path] = Field(default_factory=list, description="files of regular expressions matched against the whole URL")
    regexes: list[str] = Field(default_factory=list)


class IngestConfig(Strict):
    shard_size: int = Field(1000, ge=1, le=1 << 20, description="input items per ingest shard")
    http: HttpConfig = Field(default_factory=HttpConfig)
    url_rules: UrlRulesConfig = Field(default_factory=UrlRulesConfig)
    url_column: str | None = Field(None, description="column holding URLs in Parquet/CSV inputs (auto-detected if unset)")
    bytes_column: str | None = Field(None, description="column holding image bytes in Parquet inputs (auto-detected if unset)")
    caption_column: str | None = Field(
        None, description="column holding captions in Parquet/CSV inputs (auto: caption, text, TEXT, alt_text, alt); tar samples: .txt"
    )
    extra_columns: list[str] | dict[str, Literal["string", "int64", "float64", "bool"]] = Field(
        default_factory=list,
        description="input columns passed through to the dataset (Parquet/CSV columns, keys of a tar sample's .json), "
        "like img2dataset's save_additional_columns: a list (stored as strings) or {name: type}",
    )

    @field_validator("extra_columns")
    @classmethod
    def _extra_names(cls, value):
        from curation.contract import COLUMNS

        reserved = {c.name for c in COLUMNS} | {"role", "bytes", "final_url", "http_status", "content_type"}
        clash = sorted(set(value) & reserved)
        if clash:
            raise ValueError(f"{clash} are columns of the dataset already; pass through other columns")
        return value

    def extra_types(self) -> dict[str, str]:
        """Pass-through column name -> type."""
        if isinstance(self.extra_columns, dict):
            return dict(self.extra_columns)
        return {name: "string" for name in self.extra_columns}


# -- seed recipes (Table 15 of the DINOv2 paper) -----------------------------------------------
class AsIs(Strict):
    method: Literal["as_is"] = "as_is"


class Sample(Strict):
    method: Literal["sample"] = "sample"
    k: int = Field(4, ge=1, description="pool neighbours retrieved per seed image")
    min_similarity: float | None = Field(None, ge=-1, le=1)


class Cluster(Strict):
    method: Literal["cluster"] = "cluster"
    min_seeds: int = Field(3, ge=0, description="clusters holding more than this many seed images are taken")
    per_cluster: int = Field(10_000, ge=1)
    cap: int = Field(1_000_000, ge=1, description="most images retrieved for this seed dataset (the target size of balanced sampling)")
    sampling: Literal["closest", "balanced"] = Field(
        "closest",
        description="closest: each selected cluster's per_cluster images nearest its centroid, round-robin under cap (DINOv2); "
        "balanced: hierarchical balanced sampling (Vo et al. 2024) of the selected clusters down to cap images, "
        "split evenly at every level of stages.retrieve.clustering.hierarchy",
    )
    pick: Literal["random", "closest"] = Field("random", description="balanced sampling: which images of a level-1 cluster fill its quota")


Recipe = Annotated[Union[AsIs, Sample, Cluster], Field(discriminator="method")]


class SeedEntry(Strict):
    path: str = Field(description="folder of class subfolders, tar shards, Parquet; ${ENV} allowed")
    recipes: list[Recipe] = Field(default_factory=lambda: [AsIs()])
    description: str = ""


class ExcludeEntry(Strict):
    path: str
    description: str = ""


class RayConfig(Strict):
    address: str | None = Field(None, description="existing cluster ('auto' or host:port); None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    dashboard_host: str = Field("127.0.0.1", description="bind address of the local dashboard; keep loopback unless you firewall it")
    include_dashboard: bool = True
    object_store_memory: int | None = None


class ExecutionConfig(Strict):
    """How global stages run: in one task, or partitioned with memory bounded per task."""

    global_stages: Literal["auto", "single_task", "partitioned"] = Field(
        "auto",
        description="auto: one task up to single_task_max_rows input rows, partitioned beyond (stages "
        "without a partitioned form always run as one task)",
    )
    single_task_max_rows: int = Field(500_000, ge=0, description="largest input a global stage reads into one task under auto")
    max_partition_rows: int = Field(
        250_000, ge=1, description="rows a reduce task of a partitioned stage holds at once (sizes the shuffle partitions)"
    )
    map_task_rows: int = Field(200_000, ge=1, description="input rows per map task (consecutive shards are grouped up to this)")
    task_memory_bytes: int | None = Field(None, ge=1, description="memory Ray reserves per partitioned task (None: no reservation)")
    stage_retries: int = Field(
        2, ge=0, description="times a shard stage reruns its unfinished shards after Ray lost a worker, an actor or a node"
    )


class EmitConfig(Strict):
    """What the run writes as its dataset (see the column contract, ``curation.contract``)."""

    formats: list[Literal["parquet", "webdataset"]] = Field(
        default_factory=lambda: ["parquet"],
        description="parquet: dataset/part-*.parquet (what the trainer and `curate query` read); webdataset: webdataset/part-*.tar "
        "(<key>.jpg/.png + <key>.json + <key>.txt caption); both: the same samples in the same shards",
        min_length=1,
    )
    shard_rows: int | None = Field(10_000, ge=1, description="images per output shard (the last one holds the rest); null: no row target")
    shard_bytes: int | None = Field(
        None, ge=1, description="image bytes per output shard; a shard closes when either target is reached. Both null: one output shard per ingest shard"
    )
    row_group_rows: int = Field(256, ge=1, description="rows per Parquet row group (the trainer's unit of shuffling)")

    @field_validator("formats")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class ModelsConfig(Strict):
    """How a run gets its model weights (see ``curate models``); not part of the fingerprint."""

    auto_fetch: bool = Field(False, description="before a run, download missing weights into the cache when the network is reachable")
    trust_on_first_use: bool = Field(
        False, description="let auto_fetch accept files whose upstream publishes no checksum (their first sha256 is recorded and verified later)"
    )


class PipelineConfig(Strict):
    name: str = "lvd"
    seed: int = Field(0, description="random seed for every stochastic step")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    stages: list[SerializeAsAny[StageConfig]] = Field(default_factory=list)
    seeds_catalog: dict[str, SeedEntry] = Field(default_factory=dict)
    excludes_catalog: dict[str, ExcludeEntry] = Field(default_factory=dict)
    default_seed_recipes: list[Recipe] = Field(
        default_factory=lambda: [AsIs(), Sample(k=4)],
        description="recipes for a seed dataset given as a path rather than a catalog name",
    )
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    emit: EmitConfig = Field(default_factory=EmitConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)

    @field_validator("stages", mode="before")
    @classmethod
    def _validate_stages(cls, raw: Any) -> list[StageConfig]:
        """Every entry is validated, so one message lists the problems of all stages."""
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ValueError("stages must be a list of {kind: ..., ...} entries")
        out: list[StageConfig] = []
        problems: list[str] = []
        for i, entry in enumerate(raw):
            if isinstance(entry, StageConfig):
                out.append(entry)
                continue
            if not isinstance(entry, dict) or "kind" not in entry:
                problems.append(f"stages[{i}] must be a mapping with a 'kind'")
                continue
            try:
                model = stage_class(entry["kind"]).Config
            except StageError as e:
                problems.append(f"stages[{i}]: {e}")
                continue
            try:
                out.append(model.model_validate(entry))
            except ValidationError as e:
                problems += [f"stages[{i}] ({entry['kind']}): {line}" for line in error_lines(e)]
        if problems:
            raise ValueError("\n".join(problems))
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> "PipelineConfig":
        # Compared as `curate query` names their views (stage_<name>: case-insensitive, '-' as '_').
        keys = [s.stage_name.lower().replace("-", "_") for s in self.stages]
        dup = sorted({s.stage_name for s, k in zip(self.stages, keys) if keys.count(k) > 1})
        if dup:
            raise ValueError(f"stage names must be unique (ignoring case, '-' = '_'); give these a distinct 'name': {dup}")
        return self

    def enabled_stages(self) -> list[StageConfig]:
        return [s for s in self.stages if s.enabled]

    def stage_config(self, kind: str) -> StageConfig | None:
        for s in self.stages:
            if s.kind == kind and s.enabled:
                return s
        return None

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (used to refuse an inconsistent resume).
        Where Ray runs (address, CPUs, dashboard) and how weights are fetched (their checksums
        are checked) do not change the output and are left out."""
        payload = json.dumps(self.model_dump(mode="json", exclude={"ray": True, "models": True, "execution": {"stage_retries"}}), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A pipeline file that cannot be used; the message says where and why."""


def error_lines(e: ValidationError) -> list[str]:
    """One ``where: what`` line per problem (stage entries already carry their own place)."""
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"] == ("stages",) and msg.startswith("stages["):
            lines += msg.split("\n")
            continue
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {msg}")
    return lines


def _format_errors(e: ValidationError) -> str:
    lines = error_lines(e)
    if len(lines) == 1:
        return lines[0]
    return f"{len(lines)} problems:\n" + "\n".join(f"  {line}" for line in lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML (a path, or a name in pipelines/ such as 'lvd' or 'demo').

    ``overrides`` is merged into the file; ``sets`` are ``KEY=VALUE`` strings (``--set``), see
    :func:`apply_set` for how keys address fields and stages."""
    resolved = resolve_pipeline_path(path)
    try:
        raw = yaml.safe_load(resolved.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{resolved}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{resolved}: the top level must be a mapping")
    if overrides:
        raw = _deep_merge(raw, overrides)
    for item in sets or []:
        apply_set(raw, item)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        where = f"{resolved} with " + " ".join(f"--set {x}" for x in sets) if sets else str(resolved)
        raise ConfigError(f"{where}: {_format_errors(e)}") from None


def apply_set(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--set KEY=VALUE`` to a raw pipeline mapping, in place.

    KEY is dotted: ``ingest.shard_size``, ``ingest.http.retries``, ``models.auto_fetch``. Inside
    a list a part is an index (``default_seed_recipes.1.k``); inside ``stages`` it may also be a
    stage's name (its ``name:``, else its ``kind``): ``stages.copy_dedup.threshold``,
    ``stages.sscd.model.path``, ``stages.nsfw.enabled``. VALUE is read as YAML (``0.7``,
    ``false``, ``[a, b]``, ``{type: pixels}``). Fields missing from the file are added and
    validated like the rest; a whole stage cannot be added this way."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ingest.shard_size=500")
    key, text = item.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {e}") from None
    node: Any = raw
    for depth, k in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            i = _list_index(node, k, here, item)
            if last:
                raise ConfigError(f"--set {item!r}: {here} is a whole list entry; set one of its fields ({here}.FIELD=...)")
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[k] = value
            else:
                if node.get(k) is None:
                    node[k] = {}
                elif not isinstance(node[k], (dict, list)):
                    raise ConfigError(f"--set {item!r}: {here} is a value ({node[k]!r}), not a section")
                node = node[k]
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(keys[:depth])} is a value, not a section")


def _list_index(entries: list, key: str, here: str, item: str) -> int:
    if key.lstrip("-").isdigit():
        i = int(key)
        if not -len(entries) <= i < len(entries):
            raise ConfigError(f"--set {item!r}: {here}: index out of range (the list has {len(entries)} entries)")
        return i
    names = [e.get("name") or e.get("kind") if isinstance(e, dict) else None for e in entries]
    matches = [i for i, n in enumerate(names) if n == key]
    if len(matches) != 1:
        known = ", ".join(str(n) for n in names if n) or "none"
        problem = "matches several entries" if matches else "matches no entry"
        raise ConfigError(f"--set {item!r}: {key!r} {problem} of {here.rsplit('.', 1)[0]} (names: {known}; or use an index)")
    return matches[0]


def resolve_pipeline_path(path: str | Path | None) -> Path:
    if path is None:
        path = "lvd"
    p = Path(path)
    if p.is_file():
        return p
    candidate = PIPELINES_DIR / f"{path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(x.stem for x in PIPELINES_DIR.glob("*.yaml"))
    raise ConfigError(f"no pipeline file {path!r}; give a YAML path or one of: {', '.join(known)}")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, what: str) -> str:
    """Expand ${VAR} in catalog paths; an unset variable is an error that names it."""

    def repl(m: re.Match) -> str:
        var = m.group(1)
        if var not in os.environ:
            raise ConfigError(f"{what} uses ${{{var}}}, which is not set: export {var}=/path/to/data")
        return os.environ[var]

    return _ENV.sub(repl, value)
