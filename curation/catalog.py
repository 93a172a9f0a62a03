"""Resolve ``--seeds`` / ``--exclude`` arguments: catalog names or paths.

A catalog name maps to a local path and, for seeds, a retrieval recipe (Table 15 of the DINOv2
paper). A path given directly gets the pipeline's ``default_seed_recipes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from curation.config import ConfigError, PipelineConfig, expand_env


@dataclass(frozen=True)
class ResolvedSet:
    name: str
    path: str
    recipes: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "recipes": [dict(r) for r in self.recipes]}


def _name_for_path(p: Path) -> str:
    stem = p.name
    for suffix in (".parquet", ".tar", ".txt", ".csv"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem or "seeds"


def resolve_seeds(args: list[str], config: PipelineConfig) -> list[ResolvedSet]:
    out: list[ResolvedSet] = []
    for arg in args:
        if arg in config.seeds_catalog:
            entry = config.seeds_catalog[arg]
            path = expand_env(entry.path, f"seeds_catalog.{arg}.path")
            if not Path(path).exists():
                raise ConfigError(f"seed dataset {arg!r} points at {path}, which does not exist; fix seeds_catalog.{arg}.path in the pipeline YAML")
            out.append(ResolvedSet(arg, str(Path(path).resolve()), tuple(r.model_dump() for r in entry.recipes)))
        elif Path(arg).exists():
            p = Path(arg).resolve()
            out.append(ResolvedSet(_name_for_path(p), str(p), tuple(r.model_dump() for r in config.default_seed_recipes)))
        else:
            known = ", ".join(sorted(config.seeds_catalog)) or "(none)"
            raise ConfigError(
                f"unknown seed dataset {arg!r}: not a catalog name and not an existing path. "
                f"Known names: {known}. Register one under 'seeds_catalog:' in the pipeline YAML "
                f"(name: {{path: /data/..., recipes: [{{method: sample, k: 4}}]}}) or pass a folder/tar/Parquet path."
            )
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"seed datasets must have distinct names; repeated: {dup}")
    return out


def resolve_excludes(args: list[str], config: PipelineConfig) -> list[ResolvedSet]:
    out: list[ResolvedSet] = []
    for arg in args:
        if arg in config.excludes_catalog:
            path = expand_env(config.excludes_catalog[arg].path, f"excludes_catalog.{arg}.path")
            if not Path(path).exists():
                raise ConfigError(f"evaluation set {arg!r} points at {path}, which does not exist")
            out.append(ResolvedSet(arg, str(Path(path).resolve())))
        elif Path(arg).exists():
            p = Path(arg).resolve()
            out.append(ResolvedSet(_name_for_path(p), str(p)))
        else:
            known = ", ".join(sorted(config.excludes_catalog)) or "(none)"
            raise ConfigError(f"unknown evaluation set {arg!r}: not a catalog name and not an existing path. Known names: {known}.")
    return out
