"""``curate models list | fetch | verify``: the weights a pipeline needs, in one cache."""

from __future__ import annotations

import argparse
import json
import sys

from curation.models import ModelEntry, WeightsError, cache_dir, entry, expected_sha256, installed_timm_entries, pipeline_needs, static_entries


def _pipeline(args):
    from curation.config import load_config

    return load_config(args.config, sets=args.set)


def _print_rows(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def cmd_list(args) -> int:
    from curation.model_fetch import verify

    if args.all:
        entries = list(static_entries().values()) + installed_timm_entries()
        entries += [entry(n.entry) for n in pipeline_needs(_pipeline(args)) if n.entry and n.entry not in {e.name for e in entries}]
        data = [{"name": e.name, "status": verify(e)[0] if e.path.is_file() else "missing", "pinned_sha256": e.sha256, "path": str(e.path), "url": e.url, "description": e.description} for e in entries]
        if args.json:
            print(json.dumps({"cache": str(cache_dir()), "models": data}, indent=2))
        else:
            print(f"weights cache: {cache_dir()}")
            _print_rows([["name", "status", "checksum", "path"]] + [[d["name"], d["status"], "pinned" if d["pinned_sha256"] else "none upstream", d["path"]] for d in data])
        return 0
    needs = pipeline_needs(_pipeline(args))
    if args.json:
        print(json.dumps({"cache": str(cache_dir()), "needs": [n.to_dict() for n in needs]}, indent=2))
        return 0
    print(f"weights cache: {cache_dir()}")
    if not needs:
        print("this pipeline loads no model weights")
        return 0
    rows = [["stage", "model", "status", "fetch as", "path"]]
    rows += [[n.stage, n.model, "present" if n.present else "MISSING", n.entry or "-", str(n.path or "-")] for n in needs]
    _print_rows(rows)
    for n in needs:
        if not n.present:
            print(f"  {n.stage}: {n.problem}")
    return 0


def cmd_fetch(args) -> int:
    from curation.model_fetch import fetch

    if args.names:
        targets = [entry(name) for name in args.names]
    else:
        needs = pipeline_needs(_pipeline(args))
        for n in needs:
            if not n.present and not n.entry:
                print(f"cannot fetch for stage {n.stage!r}: {n.problem}; {n.offline}", file=sys.stderr)
        targets = [entry(name) for name in sorted({n.entry for n in needs if n.entry and not n.present})]
        if not targets:
            print("nothing to fetch: every model file the pipeline needs is present" if all(n.present for n in needs) else "nothing that can be fetched")
            return 0 if all(n.present for n in needs) else 1
    unpinned = [e.name for e in targets if expected_sha256(e) is None and not e.path.is_file()]
    if unpinned and not args.trust_on_first_use:
        raise WeightsError(
            f"upstream publishes no sha256 for {', '.join(unpinned)}, so these downloads cannot be verified; pass "
            "--trust-on-first-use to accept them (their sha256 is recorded in the cache's checksums.json, enforced on "
            "re-fetch and checked by `curate models verify`), or copy files you checked yourself into the cache"
        )
    failed = 0
    for e in targets:
        try:
            got = fetch(e, trust_on_first_use=args.trust_on_first_use, progress=not args.no_progress)
            print(f"{got.status}: {e.name} -> {e.path} (sha256 {got.sha256})")
        except WeightsError as err:
            failed += 1
            print(f"curate models fetch: {err}", file=sys.stderr)
    return 1 if failed else 0


def cmd_verify(args) -> int:
    from curation.model_fetch import verify

    if args.names:
        targets = [entry(name) for name in args.names]
    else:
        targets: list[ModelEntry] = [e for e in static_entries().values() if e.path.is_file()] + installed_timm_entries()
        needed = [entry(n.entry) for n in pipeline_needs(_pipeline(args)) if n.entry]
        targets += [e for e in needed if e.name not in {t.name for t in targets}]
    if not targets:
        print(f"nothing to verify: no model file in {cache_dir()}")
        return 0
    bad = 0
    for e in targets:
        status, detail = verify(e)
        bad += status in ("mismatch", "missing")
        print(f"{status:<9} {e.name}: {detail}")
    return 1 if bad else 0


EXAMPLES = {
    "list": "curate models list --config lvd\n  curate models list --all --json",
    "fetch": "curate models fetch --config lvd --trust-on-first-use\n  CURATION_MODELS=/shared/weights curate models fetch sscd_disc_mixup opennsfw2 --trust-on-first-use",
    "verify": "curate models verify\n  curate models verify sscd_disc_mixup",
}


def add_subcommands(subparsers) -> None:
    desc = (
        f"Model weights live in one cache, $CURATION_MODELS (now {cache_dir()}); a run looks there first, "
        "then where the model libraries look (opennsfw2's home, the Hugging Face and torch hub caches)."
    )
    p = subparsers.add_parser("models", help="list, fetch and verify the model weights a pipeline needs", description=desc)
    sub = p.add_subparsers(dest="models_command", required=True)

    def pipeline_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", default=None, help="pipeline YAML or a name in pipelines/ (default: lvd)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline option, as for `curate run`")

    q = sub.add_parser("list", help="every model the pipeline needs: present or not, and its path",
                       description="Every model file the pipeline's stages load, whether it is present, and where it is (or is expected).")
    pipeline_options(q)
    q.add_argument("--all", action="store_true", help="every model the registry knows, installed or not")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("fetch", help="download weights into the cache (resumable, sha256-checked)",
                       description="Download model files into the cache with a progress bar, resuming an interrupted download. "
                       "A file whose sha256 differs from the pinned (or first recorded) one is refused and nothing is installed.")
    q.add_argument("names", nargs="*", help="registry names (see `curate models list --all`; timm/<model> for timm); default: what the pipeline misses")
    pipeline_options(q)
    q.add_argument("--trust-on-first-use", action="store_true", help="accept files whose upstream publishes no checksum, recording their sha256")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_fetch)

    q = sub.add_parser("verify", help="check the sha256 of the weights in the cache",
                       description="Check every installed model file (or the ones named) against its pinned or first-recorded sha256; exit 1 on a mismatch or a missing file.")
    q.add_argument("names", nargs="*")
    pipeline_options(q)
    q.set_defaults(func=cmd_verify)
    for name, q in sub.choices.items():
        q.epilog = f"example:\n  {EXAMPLES[name]}"
        q.formatter_class = argparse.RawDescriptionHelpFormatter
