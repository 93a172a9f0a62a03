"""What changed between the configuration a run directory holds and the one given now.

A resume with a different fingerprint is refused; the message names the changed keys in the
dotted form ``--set`` takes (stages by their name: ``stages.decode.min_side``), with the old and
new values, so the user sees at once whether to fix the command or pick a new ``--out``.
"""

from __future__ import annotations

import json
from typing import Any

# Keys left out of the fingerprint (PipelineConfig.fingerprint): never reported.
IGNORED = ("ray", "models", "execution.stage_retries")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stages_by_name(stages: list) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i, s in enumerate(stages):
        name = (s.get("name") or s.get("kind") or f"#{i}") if isinstance(s, dict) else f"#{i}"
        out[name] = s
    return out


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (added keys: ``(unset) -> new``)."""
    if prefix in IGNORED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in IGNORED:
                continue
            if k in old and k in new:
                out += changed_keys(old[k], new[k], key)
            else:
                before, after = (_short(old[k]), "(unset)") if k in old else ("(unset)", _short(new[k]))
                out.append(f"{key}: {before} -> {after}")
        return out
    if prefix == "stages" and isinstance(old, list) and isinstance(new, list):
        a, b = _stages_by_name(old), _stages_by_name(new)
        out = [f"stages: order {list(a)} -> {list(b)}"] if list(a) != list(b) and set(a) == set(b) else []
        out += [f"stages.{n}: removed" for n in a if n not in b]
        out += [f"stages.{n}: added" for n in b if n not in a]
        for n in a:
            if n in b:
                out += changed_keys(a[n], b[n], f"stages.{n}")
        return out
    return [] if old == new else [f"{prefix}: {_short(old)} -> {_short(new)}"]


def describe_change(old_run: dict, config: dict, inputs: dict) -> str:
    """The changed configuration keys and inputs, one ``;``-separated list (at most 12 named)."""
    changes = changed_keys(old_run.get("config", {}), config)
    changes += [f"inputs.{c}" for c in changed_keys(old_run.get("inputs", {}), inputs)]
    if not changes:
        return "no configuration key differs (the run was written by another version of curation)"
    more = f"; and {len(changes) - 12} more" if len(changes) > 12 else ""
    return "; ".join(changes[:12]) + more
