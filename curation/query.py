"""``curate query``: DuckDB SQL over a run's dataset, ledger, manifest and stage outputs."""

from __future__ import annotations

from pathlib import Path

import duckdb


def connect(run_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """Views: ``dataset``, ``ledger``, ``shards`` (from the manifest), and ``stage_<name>`` for
    every stage directory (uid + the columns that stage wrote)."""
    run = Path(run_dir)
    if not (run / "run.json").exists():
        raise FileNotFoundError(f"{run} is not a run directory (no run.json)")
    con = duckdb.connect()
    def q(p: Path) -> str:
        return str(p).replace("'", "''")
    if any((run / "dataset").glob("*.parquet")):
        con.execute(f"CREATE VIEW dataset AS SELECT * FROM read_parquet('{q(run / 'dataset')}/*.parquet')")
    if any((run / "ledger").rglob("*.parquet")):
        con.execute(f"CREATE VIEW ledger AS SELECT * FROM read_parquet('{q(run / 'ledger')}/*/*.parquet', union_by_name=true)")
    if (run / "manifest.json").exists():
        con.execute(f"CREATE VIEW manifest AS SELECT * FROM read_json_auto('{q(run / 'manifest.json')}')")
        con.execute("CREATE VIEW shards AS SELECT unnest(shards, recursive := true) FROM manifest")
    for d in sorted((run / "stages").glob("*_*")):
        if any(d.glob("part-*.parquet")):
            name = d.name.split("_", 1)[1].replace("-", "_")
            con.execute(f"CREATE VIEW stage_{name} AS SELECT * FROM read_parquet('{q(d)}/part-*.parquet')")
    return con


def run_query(run_dir: str | Path, sql: str):
    return connect(run_dir).sql(sql)
