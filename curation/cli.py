"""``curate``: a thin command line over the library (curation.runner, curation.query, ...).

Exit codes, for every subcommand:

* 0 -- it worked;
* 2 -- refused before any work: bad usage, a configuration error (all of them listed at once),
  missing inputs or model weights, a run directory that holds another run, a bad SQL query;
* 1 -- it failed while working (a stage failed, a download broke off, an unexpected error,
  which prints its traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


class UsageError(Exception):
    """Arguments that do not make a command (exit code 2)."""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", action="append", default=[], required=True, help="crawl input: folder, tar shards, Parquet or URL list (repeatable)")
    p.add_argument("--seeds", action="append", default=[], help="seed dataset: catalog name (e.g. imagenet22k) or path (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="evaluation set to decontaminate against: catalog name or path (repeatable)")
    p.add_argument("--out", default="runs/latest", help="run directory (default: runs/latest)")
    p.add_argument("--config", default=None, help="pipeline YAML or a name in pipelines/ (default: lvd)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a pipeline option (repeatable): ingest.shard_size=500, stages.copy_dedup.threshold=0.7 "
        "(a stage by its name, else its kind, or its index), stages.nsfw.enabled=false; VALUE is YAML",
    )
    p.add_argument(
        "--allow-missing-weights", action="store_true",
        help="run every model stage whose weights are missing (nsfw, embed) as NOT applied: its column stays empty, "
        "it drops nothing, and the manifest and summary say so",
    )
    p.add_argument("--fetch-weights", action="store_true", help="download missing weights into the cache first, when the network is reachable")
    p.add_argument("--trust-on-first-use", action="store_true", help="with --fetch-weights: accept weights whose upstream publishes no checksum")
    p.add_argument(
        "--replan", action="store_true",
        help="if the inputs changed since the run was planned, discard the run's outputs and plan again "
        "from the inputs as they are now (otherwise such a re-run is refused); with unchanged inputs it resumes",
    )
    p.add_argument(
        "--progress", choices=("auto", "live", "lines", "off"), default="auto",
        help="live: bars redrawn in the terminal; lines: a line per stage every --progress-interval seconds and at its end "
        "(for logs and CI); auto (default): live on a terminal, lines otherwise. Written to stderr",
    )
    p.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS", help="seconds between progress lines (default 30)")


def cmd_run(args) -> int:
    from curation.runlock import RunLocked, check_free

    dry = getattr(args, "dry_run", False)
    if not dry:  # a dry run reports a busy directory instead
        try:
            check_free(args.out)  # a busy directory is refused before the pipeline's modules load
        except RunLocked as e:
            raise UsageError(str(e)) from None
    from curation.config import load_config
    from curation.models import check_pipeline
    from curation.runner import run_pipeline
    from curation.summary import print_summary

    cfg = load_config(args.config, sets=args.set)
    missing_pools = [p for p in args.pool if not Path(p).exists()]
    if missing_pools:
        raise UsageError(f"--pool path(s) do not exist: {', '.join(missing_pools)}")
    if dry:
        return _dry_run(args, cfg)
    notes = check_pipeline(
        cfg, allow_missing=args.allow_missing_weights, fetch=args.fetch_weights,
        trust_on_first_use=args.trust_on_first_use, seeds=bool(args.seeds),
    )
    for note in notes:
        print(f"curate run: {'WARNING: ' if 'NOT applied' in note else ''}{note}", file=sys.stderr)
    manifest = run_pipeline(_run_request(args, cfg))
    print_summary(manifest)
    return EXIT_OK


def _run_request(args, cfg):
    from curation.runner import RunRequest

    return RunRequest(
        pools=args.pool,
        seeds=args.seeds,
        excludes=args.exclude,
        out=Path(args.out),
        config=cfg,
        address=args.address,
        resume=args.resume,
        replan=args.replan,
        allow_missing_weights=args.allow_missing_weights,
        progress=args.progress,
        progress_interval=args.progress_interval,
    )


def _dry_run(args, cfg) -> int:
    """0 when the run would start or resume, 2 when it would be refused (weights, run directory)."""
    from curation.dry_run import dry_run, format_dry_run

    report = dry_run(_run_request(args, cfg))
    print(format_dry_run(report))
    return EXIT_OK if report["state"] != "refused" and report["weights"]["ok"] else EXIT_REFUSED


def cmd_query(args) -> int:
    import duckdb

    from curation.query import run_query

    try:
        rel = run_query(args.run, args.sql)
        if args.format == "csv":
            rel.to_df().to_csv(sys.stdout, index=False)
        elif args.format == "json":
            print(rel.to_df().to_json(orient="records", default_handler=str))
        else:
            rel.show(max_rows=args.max_rows, max_width=200)
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"query failed: {first} (views: dataset, ledger, manifest, shards, stage_<name>)") from None
    return EXIT_OK


def cmd_status(args) -> int:
    if args.job:
        from curation.jobs import job_status

        print(json.dumps(job_status(args.job, args.address), indent=2))
        return EXIT_OK
    if not args.run:
        raise UsageError("curate status: give --run DIR or a JOB id with --address")
    from curation.run_state import describe, run_state

    run = Path(args.run)
    state = run_state(run)
    if state["status"] is None and state["holder"] is None:
        raise UsageError(f"{run} has no status.json: not a run directory, or the run has not started")
    print("\n".join(describe(state)))
    current = (state["status"] or {}).get("current")
    if current:
        from curation.progress import describe_snapshot

        print(f"  now: {describe_snapshot(current)}")
    for s in (state["status"] or {}).get("stats", []):
        print(f"  {s['stage']:<20} in {s.get('in', 0):>8}  out {s.get('out', 0):>8}  dropped {sum(s.get('dropped', {}).values()):>6}")
    manifest = run / "manifest.json"
    if manifest.exists():
        from curation.summary import print_summary

        print_summary(json.loads(manifest.read_text()))
    return EXIT_OK


def cmd_stages(args) -> int:
    """Every stage kind with its options, read from the stage's pydantic Config; then the seed recipes."""
    from curation.config import AsIs, Cluster, Sample
    from curation.stage import available_kinds, stage_class

    for kind in available_kinds():
        cls = stage_class(kind)
        doc = (cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip().split("\n")[0]
        print(f"{kind}: {doc}")
        _print_fields(cls.Config, skip=("kind", "name", "enabled"))
    print("seed recipes (seeds_catalog.<name>.recipes: a list, one entry per method, DINOv2 Table 15):")
    for recipe in (AsIs, Sample, Cluster):
        print(f"  method: {recipe.model_fields['method'].default}")
        _print_fields(recipe, skip=("method",), indent="      ")
    return EXIT_OK


def _print_fields(model, skip=(), indent="    ", prefix="") -> None:
    """One line per option; nested option groups are spelled out as dotted names."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        if name in skip:
            continue
        default = field.default if field.default_factory is None else field.default_factory()
        if isinstance(default, BaseModel):
            if field.description:
                print(f"{indent}{prefix}{name}:  -- {field.description}")
            _print_fields(type(default), indent=indent, prefix=f"{prefix}{name}.")
            continue
        desc = f"  -- {field.description}" if field.description else ""
        print(f"{indent}{prefix}{name} = {default!r}{desc}")


def cmd_demo(args) -> int:
    from curation.demo import run_demo

    return run_demo(Path(args.out), keep_server=False)


def cmd_submit(args) -> int:
    from curation.jobs import submit_run

    job_id = submit_run(args)
    print(job_id)
    return EXIT_OK


def cmd_logs(args) -> int:
    from curation.jobs import job_logs

    job_logs(args.job, args.address, follow=args.follow)
    return EXIT_OK


def cmd_stop(args) -> int:
    from curation.jobs import stop_job

    print(json.dumps({"job": args.job, "stopped": stop_job(args.job, args.address)}))
    return EXIT_OK


# What each subcommand does and one way to call it; shown by `curate COMMAND --help`.
HELP = {
    "run": ("Curate a crawl: ingest the pools, run the pipeline's stages, write RUN/dataset and RUN/manifest.json. "
            "Model weights are checked first (all missing files at once); a re-run of the same command resumes.",
            "curate run --pool crawl/ --seeds imagenet1k --out runs/lvd --config lvd --set ingest.shard_size=500"),
    "query": ("SQL (DuckDB) over a run: views dataset, ledger, manifest, shards and stage_<name>.",
              "curate query \"select stage, reason, count(*) from ledger group by all order by 3 desc\" --run runs/lvd"),
    "status": ("Progress of a run directory (--run) or of a job submitted to a Ray cluster (JOB --address).",
               "curate status --run runs/lvd"),
    "stages": ("Every stage kind with its options, defaults and meanings: the pipeline YAML reference.", "curate stages"),
    "demo": ("Generate a few hundred images served on 127.0.0.1 (with planted faults) plus a local folder, and curate them.",
             "curate demo --out demo-run"),
    "submit": ("Send the same run to a Ray cluster as a Ray job; the run directory must be on storage every node mounts.",
               "curate submit --address http://head:8265 --pool /mnt/crawl --out /mnt/runs/lvd --config lvd"),
    "logs": ("Logs of a submitted job.", "curate logs curate-lvd-1a2b3c4d-20240601-120000-beef --address http://head:8265 --follow"),
    "stop": ("Stop a submitted job.", "curate stop curate-lvd-1a2b3c4d-20240601-120000-beef --address http://head:8265"),
    "models": ("List, fetch and verify the model weights a pipeline needs.", "curate models list --config lvd"),
    "report": ("A self-contained HTML report of a finished run: funnel, drops with examples, score histograms, duplicate clusters, faces, retrieval.",
               "curate report runs/lvd --out lvd-report.html"),
    "train": ("DINOv2 pretraining (DINO + iBOT + KoLeo, EMA teacher) streamed from a curated manifest; resumes from RUN.",
              "curate train --manifest runs/lvd/manifest.json --output runs/vit-s --arch vit_small --set optim.epochs=10"),
    "export": ("Write the trained teacher backbone as a timm-loadable checkpoint (format curation.vit/1) for the embed stage.",
               "curate export --checkpoint runs/vit-s --output teacher.pt"),
    "eval": ("Evaluate frozen features of a checkpoint: k-NN, linear probe, or PCA images of patch features.",
             "curate eval knn --checkpoint teacher.pt --data labelled/ --k 20"),
    "eval knn": ("k-NN accuracy on a labelled folder (weighted vote, as DINO).", "curate eval knn --checkpoint teacher.pt --data labelled/ --k 20"),
    "eval linear": ("Linear-probe accuracy on frozen features of a labelled folder.", "curate eval linear --checkpoint runs/vit-s --data labelled/"),
    "eval pca": ("PNGs of the first three PCA components of patch features.", "curate eval pca --checkpoint teacher.pt --images photos/ --output pca/"),
}


def _document(sub: argparse._SubParsersAction, prefix: str = "") -> None:
    """Give every subcommand (nested ones too) its description and example, unless it has its own."""
    for name, p in sub.choices.items():
        key = f"{prefix}{name}"
        if key in HELP:
            desc, example = HELP[key]
            p.description = p.description or desc
            p.epilog = p.epilog or f"example:\n  {example}"
            p.formatter_class = argparse.RawDescriptionHelpFormatter
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _document(action, f"{key} ")


def build_parser() -> argparse.ArgumentParser:
    from curation import __version__

    parser = argparse.ArgumentParser(
        prog="curate", description="Curate an LVD-style dataset from a raw image crawl.",
        epilog="exit codes: 0 ok; 2 refused before any work (usage, configuration, missing inputs or weights); 1 failed while working",
    )
    parser.add_argument("--version", action="version", version=f"curate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a curation pipeline")
    _add_run_options(p)
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto or 10.0.0.1:6379); default: local Ray")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (a plain re-run of the same command does too)")
    p.add_argument(
        "--dry-run", action="store_true",
        help="print the resolved config, the plan (inputs, shards), the weights check and the stages that would run "
        "(a global stage's form: single task or partitioned); nothing is written and Ray is not started",
    )
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

    from curation.models_cli import add_subcommands as add_models

    add_models(sub)
    try:
        from curation.train.cli import add_subcommands
    except ImportError:  # the trainer is optional at import time (e.g. a trimmed install)
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    try:
        from curation.report import add_subcommands as add_report
    except ImportError:
        add_report = None
    if add_report is not None:
        add_report(sub)
    _document(sub)
    return parser


def refusals() -> tuple[type[BaseException], ...]:
    """Errors that mean "refused before any work" (exit code 2); they print as one line. An
    ``IngestError`` can only have been raised if the ingest package was loaded, so a refused
    ``curate run`` does not load it (the run lock is taken before the heavy imports)."""
    from curation.config import ConfigError
    from curation.models import WeightsError
    from curation.runner import RunError  # the runner raises it only to refuse a run (inputs, lock, resume)

    ingest = sys.modules.get("curation.ingest.errors")
    return (UsageError, ConfigError, WeightsError, RunError, FileNotFoundError, *([ingest.IngestError] if ingest else []))


def main(argv: list[str] | None = None) -> int:
    from curation.stage import StageError

    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with 2 here
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except refusals() as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except StageError as e:  # raised by stages while they work (the weights were checked before)
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
