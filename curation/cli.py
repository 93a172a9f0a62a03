"""``curate``: a thin command line over the library (curation.runner, curation.query, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", action="append", default=[], required=True, help="crawl input: folder, tar shards, Parquet or URL list (repeatable)")
    p.add_argument("--seeds", action="append", default=[], help="seed dataset: catalog name (e.g. imagenet22k) or path (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="evaluation set to decontaminate against: catalog name or path (repeatable)")
    p.add_argument("--out", default="runs/latest", help="run directory (default: runs/latest)")
    p.add_argument("--config", default=None, help="pipeline YAML or a name in pipelines/ (default: lvd)")
    p.add_argument("--allow-missing-weights", action="store_true", help="run stages whose model weights are missing as NOT applied, reported loudly")
    p.add_argument(
        "--replan", action="store_true",
        help="if the inputs changed since the run was planned, discard the run's outputs and plan again "
        "from the inputs as they are now (otherwise such a re-run is refused); with unchanged inputs it resumes",
    )


def cmd_run(args) -> int:
    from curation.config import load_config
    from curation.runner import RunRequest, run_pipeline
    from curation.summary import print_summary

    cfg = load_config(args.config)
    req = RunRequest(
        pools=args.pool,
        seeds=args.seeds,
        excludes=args.exclude,
        out=Path(args.out),
        config=cfg,
        address=args.address,
        resume=args.resume,
        replan=args.replan,
        allow_missing_weights=args.allow_missing_weights,
    )
    manifest = run_pipeline(req)
    print_summary(manifest)
    return 0


def cmd_query(args) -> int:
    from curation.query import run_query

    rel = run_query(args.run, args.sql)
    if args.format == "csv":
        rel.to_df().to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(rel.to_df().to_json(orient="records", default_handler=str))
    else:
        rel.show(max_rows=args.max_rows, max_width=200)
    return 0


def cmd_status(args) -> int:
    if args.job:
        from curation.jobs import job_status

        print(json.dumps(job_status(args.job, args.address), indent=2))
        return 0
    if not args.run:
        raise SystemExit("curate status: give --run DIR or a JOB id with --address")
    from curation.run_state import describe, run_state

    run = Path(args.run)
    state = run_state(run)
    if state["status"] is None and state["holder"] is None:
        raise SystemExit(f"{run} has no status.json: not a run directory, or the run has not started")
    print("\n".join(describe(state)))
    for s in (state["status"] or {}).get("stats", []):
        print(f"  {s['stage']:<20} in {s.get('in', 0):>8}  out {s.get('out', 0):>8}  dropped {sum(s.get('dropped', {}).values()):>6}")
    manifest = run / "manifest.json"
    if manifest.exists():
        from curation.summary import print_summary

        print_summary(json.loads(manifest.read_text()))
    return 0


def cmd_stages(args) -> int:
    """Every stage kind with its options, read from the stage's pydantic Config."""
    from curation.stage import available_kinds, stage_class

    for kind in available_kinds():
        cls = stage_class(kind)
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().split("\n")[0]
        print(f"{kind}: {doc}")
        for name, field in cls.Config.model_fields.items():
            if name in ("kind", "name", "enabled"):
                continue
            default = field.default if field.default_factory is None else field.default_factory()
            desc = f"  -- {field.description}" if field.description else ""
            print(f"    {name} = {default!r}{desc}")
    return 0


def cmd_demo(args) -> int:
    from curation.demo import run_demo

    return run_demo(Path(args.out), keep_server=False)


def cmd_report(args) -> int:
    from curation.report import write_report

    print(write_report(Path(args.run), Path(args.out) if args.out else None, samples=args.samples))
    return 0


def cmd_submit(args) -> int:
    from curation.jobs import submit_run

    job_id = submit_run(args)
    print(job_id)
    return 0


def cmd_logs(args) -> int:
    from curation.jobs import job_logs

    job_logs(args.job, args.address, follow=args.follow)
    return 0


def cmd_stop(args) -> int:
    from curation.jobs import stop_job

    print(json.dumps({"job": args.job, "stopped": stop_job(args.job, args.address)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate an LVD-style dataset from a raw image crawl.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a curation pipeline")
    _add_run_options(p)
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto or 10.0.0.1:6379); default: local Ray")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (a plain re-run of the same command does too)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("query", help="SQL (DuckDB) over a run: views dataset, ledger, manifest, shards, stage_<name>")
    p.add_argument("sql")
    p.add_argument("--run", required=True)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("status", help="progress of a run directory (--run) or a submitted job (JOB --address)")
    p.add_argument("job", nargs="?", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stages", help="list every stage kind and its options (the YAML reference)")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("demo", help="generate a small crawl (served on 127.0.0.1) and curate it")
    p.add_argument("--out", default="demo-run")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="send a run to a Ray cluster as a Ray job (shows in the dashboard)")
    _add_run_options(p)
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--no-wait", action="store_true", help="return the job id at once")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("logs", help="logs of a submitted job")
    p.add_argument("job")
    p.add_argument("--address", required=True)
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job")
    p.add_argument("--address", required=True)
    p.set_defaults(func=cmd_stop)

    try:
        from curation.train.cli import add_subcommands
    except ImportError:  # the trainer is optional at import time (e.g. a trimmed install)
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    p = sub.add_parser("report", help="write a self-contained HTML report of a finished run")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    p.add_argument("--samples", type=int, default=12, help="images shown per gallery (default: 12)")
    p.set_defaults(func=cmd_report)
    return parser


def _user_errors() -> tuple[type, ...]:
    """Errors whose message is the whole story (no traceback). An ``IngestError`` can only have
    been raised if the ingest package was loaded, so a refused ``curate run`` does not load it."""
    from curation.config import ConfigError
    from curation.runner import RunError
    from curation.stage import StageError

    ingest = sys.modules.get("curation.ingest.errors")
    return (ConfigError, RunError, StageError, FileNotFoundError, *([ingest.IngestError] if ingest else []))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"curate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
