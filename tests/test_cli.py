"""The command line's conventions: --version, one exit-code scheme, --set on runs, one-line
errors, and a description plus an example in every subcommand's help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from curation import __version__
from curation.cli import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, build_parser, main
from tests.helpers import manifest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_the_package(capsys):
    assert __version__ == tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"curate {__version__}"


def subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from subcommands(sub, f"{prefix}{name} ")


def test_every_subcommand_has_a_description_and_an_example():
    found = dict(subcommands(build_parser()))
    assert {"run", "query", "status", "models", "models fetch", "report", "train", "eval knn"} <= set(found)
    for name, p in found.items():
        text = p.format_help()
        assert p.description, f"curate {name} has no description"
        assert "example:\n  curate " in text, f"curate {name} --help shows no example"


def test_usage_errors_exit_with_2(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == EXIT_REFUSED
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-such-flag"])
    assert e.value.code == EXIT_REFUSED
    assert main(["status"]) == EXIT_REFUSED
    assert "give --run DIR" in capsys.readouterr().err


def test_config_errors_are_all_reported_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: {shard_size: 0}\nstages: [{kind: decode, min_side: -1}, {kind: exact_dedup, nope: 1}]\n")
    assert main(["run", "--pool", str(tmp_path), "--config", str(bad), "--out", str(tmp_path / "o")]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "3 problems" in err and "ingest.shard_size" in err and "stages[0] (decode): min_side" in err and "stages[1] (exact_dedup): nope" in err
    assert "Traceback" not in err
    assert main(["run", "--pool", str(tmp_path / "absent"), "--config", "smoke"]) == EXIT_REFUSED
    assert "--pool path(s) do not exist" in capsys.readouterr().err
    assert main(["run", "--pool", str(tmp_path), "--config", "smoke", "--set", "stages.nope.x=1"]) == EXIT_REFUSED
    assert "matches no entry of stages" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_sql_is_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    for sql in ("selec 1", "select * from no_such_view"):
        assert main(["query", sql, "--run", str(tmp_path)]) == EXIT_REFUSED
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("curate: error: query failed: ") and "Traceback" not in err
    assert main(["query", "select 1", "--run", str(tmp_path / "none")]) == EXIT_REFUSED
    assert "not a run directory" in capsys.readouterr().err


def test_a_stage_failing_while_it_works_exits_with_1(tmp_path, capsys, monkeypatch):
    import curation.runner
    from curation.stage import StageError

    def failing(req):
        raise StageError("stage decode failed on every row of shard 0: boom")

    monkeypatch.setattr(curation.runner, "run_pipeline", failing)
    assert main(["run", "--pool", str(tmp_path), "--config", "smoke", "--out", str(tmp_path / "o")]) == EXIT_FAILED
    assert "failed on every row" in capsys.readouterr().err


def test_the_entry_point_exits_with_the_scheme(tmp_path):
    env_cmd = [sys.executable, "-m", "curation.cli"]
    done = subprocess.run([*env_cmd, "--version"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert done.returncode == EXIT_OK and done.stdout.strip() == f"curate {__version__}"
    done = subprocess.run([*env_cmd, "query", "select 1", "--run", str(tmp_path)], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert done.returncode == EXIT_REFUSED and done.stderr.strip().startswith("curate: error:")


def test_set_overrides_reach_the_run(tmp_path, jpeg_factory, ray_local, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(6):
        (pool / f"{i}.jpg").write_bytes(jpeg_factory(i))
    out = tmp_path / "run"
    rc = main(["run", "--pool", str(pool), "--config", "smoke", "--out", str(out), "--set", "ingest.shard_size=2", "--set", "stages.decode.min_side=90"])
    assert rc == EXIT_OK, capsys.readouterr().err
    m = manifest(out)
    assert m["config"]["ingest"]["shard_size"] == 2 and m["config"]["stages"][0]["min_side"] == 90
    assert m["counts"]["dropped"] == {"too_small": 6}  # 96x80 images are under a 90 px short side
    # a different --set is a different configuration: the run directory refuses it
    assert main(["run", "--pool", str(pool), "--config", "smoke", "--out", str(out), "--set", "ingest.shard_size=3"]) == EXIT_REFUSED
    assert "different configuration" in capsys.readouterr().err
    json.loads((out / "run.json").read_text())


def test_stages_is_the_yaml_reference_down_to_nested_options_and_recipes(capsys):
    assert main(["stages"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "retrieve: Retrieval" in text
    assert "    clustering.hierarchy.levels = []  -- clusters of each level above the pool clustering" in text
    assert "    index.nprobe = 32" in text
    assert "  method: cluster" in text and "      sampling = 'closest'  -- closest:" in text and "      pick = 'random'" in text
