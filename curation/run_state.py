"""What a run directory says about its run, for ``curate status`` and ``curate status JOB``.

``status.json`` is what the last attempt wrote (``running``, ``finished``, ``failed``,
``refused``); the lock's holder record (``curation.runlock``) says whether a run holds the
directory now. Together they tell a run in progress (and by whom) from one that was killed:
``status.json`` still says ``running`` but its holder is gone, which reads ``interrupted``.
Nothing here takes or probes the lock, so looking never gets in a starting run's way.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from curation.runlock import read_holder


def run_state(run_dir: str | Path) -> dict:
    """``status`` (status.json or None), ``holder`` (the lock record or None), ``holder_alive``
    (True, False, or None when it runs on another host), ``in_progress`` and ``state``: the
    status's state, or ``interrupted`` for a run that stopped without saying so."""
    run_dir = Path(run_dir)
    path = run_dir / "status.json"
    status = json.loads(path.read_text()) if path.is_file() else None
    holder = read_holder(run_dir)
    alive = holder.alive() if holder is not None else None
    in_progress = holder is not None and alive is not False
    state = status["state"] if status else None
    if state == "running" and not in_progress:
        state = "interrupted"
    return {
        "state": state,
        "status": status,
        "holder": asdict(holder) if holder is not None else None,
        "holder_alive": alive,
        "in_progress": in_progress,
    }


def describe(state: dict) -> list[str]:
    """Lines for a person: the state, where it stopped and why, and who holds the directory."""
    status, holder = state["status"] or {}, state["holder"]
    who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}" if holder else ""
    lines = [f"state: {state['state'] or 'not started'}" + (f"  updated: {status['updated']}" if status.get("updated") else "")]
    if state["state"] == "running" and status.get("stage"):
        lines.append(f"  now in: {status['stage']}")
    if state["state"] == "failed":
        lines.append(f"  failed in stage {status.get('stage') or '(before the first stage)'}: {_short(status.get('error', ''))}")
    if state["state"] == "refused":
        lines.append(f"  refused: {_short(status.get('error', ''))}")
        prev = status.get("previous")
        if prev:
            lines.append(f"  previous attempt: {prev.get('state')} (updated {prev.get('updated')}); the directory still holds its outputs")
    if state["state"] == "interrupted":
        lines.append(f"  the run stopped without finishing ({who or 'no holder recorded'}; it is gone) while in {status.get('stage')}; re-run the same command to resume")
    if state["in_progress"]:
        where = "" if state["holder_alive"] else " (on another host: cannot check from here whether it still runs)"
        lines.append(f"held by: {who}{where}")
    return lines


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# A raised exception's line in a traceback's text ("IsADirectoryError: [Errno 21] ...").
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::\s.*)?$")


def error_fields(error: BaseException) -> dict:
    """status.json's account of an error: ``error`` names the root cause in one line (a worker's
    exception, not the layers of Ray wrapping it), ``error_detail`` keeps the full message.

    A worker's exception reaches the driver as text inside Ray's (``RayTaskError``), so the root
    is the first exception line of that text that is not Ray's own (the first one a chained
    traceback prints is the one that started it)."""
    full = _ANSI.sub("", str(error)).strip()
    fields = {"error": full if type(error).__module__.startswith("curation.") else f"{type(error).__name__}: {full}"}
    fields["error_type"] = type(error).__name__
    if type(error).__module__.startswith("ray"):
        raised = [m.group(0) for m in map(_RAISED.match, full.splitlines()) if m and not m.group(1).startswith("ray.")]
        if raised:
            fields["error"] = raised[0]
            fields["error_type"] = _RAISED.match(raised[0]).group(1)
        fields["error_detail"] = full[-20_000:]
    if not full:
        fields["error"] = type(error).__name__
    return fields


def _short(message: str, head: int = 2, tail: int = 3) -> str:
    """A long error (a Ray task's traceback) cut to its first and last lines."""
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if len(lines) <= head + tail:
        return "\n    ".join(lines)
    return "\n    ".join(lines[:head] + ["..."] + lines[-tail:])
