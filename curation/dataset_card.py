"""The run directory's dataset card: ``RUN/README.md`` in the Hugging Face layout.

Its YAML header's ``configs:`` point at ``dataset/*.parquet`` (and ``webdataset/*.tar``), so
``datasets.load_dataset(RUN)`` reads the dataset and not ``ledger/`` or ``stages/``, which hold
Parquet files too. The body says what the run kept and dropped and what every column means.
"""

from __future__ import annotations

import yaml

from curation.emit import PARQUET, WEBDATASET, WEBDATASET_DIR
from curation.store import RunStore

CARD = "README.md"


def card_configs(formats: list[str]) -> list[dict]:
    """One config, the Parquet files when written (the datasets library picks one builder per
    repository, from its most common file type, so a second config over the tars would be read
    as Parquet); else the tars."""
    path = "dataset/*.parquet" if PARQUET in formats else f"{WEBDATASET_DIR}/*.tar"
    return [{"config_name": "default", "data_files": [{"split": "train", "path": path}]}]


def dataset_card(manifest: dict) -> str:
    counts = manifest["counts"]
    header = {
        "configs": card_configs(manifest["dataset"]["formats"]),
        "tags": ["image", "curation", "lvd"],
        "size_categories": [size_category(counts["kept"])],
    }
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {manifest['config'].get('name', 'curation')} run",
        "",
        f"Curated by `curation` (pipeline `{manifest['config'].get('name')}`, fingerprint `{manifest['fingerprint']}`) "
        f"on {manifest['created']}: {counts['input']:,} input images, {counts['kept']:,} kept, "
        f"{sum(counts['dropped'].values()):,} dropped, each with its reason in `ledger/`.",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{manifest["run_dir"]}", split="train")   # the image column decodes to PIL images',
        *([f'wds = load_dataset("webdataset", data_files="{manifest["run_dir"]}/{WEBDATASET_DIR}/*.tar", split="train")',
           "# or webdataset.WebDataset(...): <key>.jpg/.png, <key>.json (the columns below), <key>.txt (caption)"]
          if WEBDATASET in manifest["dataset"]["formats"] and PARQUET in manifest["dataset"]["formats"] else []),
        "```",
        "",
        f"Columns (contract `{manifest['dataset']['contract']}`):",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{c['name']}` | `{c['type']}` | {c['description']} |" for c in manifest["dataset"]["columns"]]
    lines += ["", "Dropped, by reason:", ""]
    lines += [f"- `{r}`: {n:,}" for r, n in sorted(counts["dropped"].items(), key=lambda kv: -kv[1])] or ["- nothing"]
    for w in manifest.get("warnings", []):
        lines += ["", f"**Warning:** {w}"]
    return "\n".join(lines) + "\n"


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "n>1B"


def write_dataset_card(store: RunStore, manifest: dict) -> None:
    from curation.store import write_text_atomic

    write_text_atomic(dataset_card(manifest), store.run_dir / CARD)

