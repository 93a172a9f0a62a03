"""Progress of a run: one live display in a terminal, bounded-interval lines elsewhere.

The executor reports what it knows as work completes (images per finished shard, tasks per
finished step of a partitioned stage); ``RunProgress`` keeps the run's position and hands it to
a renderer and, throttled, to the driver's ``status.json`` writer. Rates exclude the work a
resumed run found already done, so images/s and the ETA describe this attempt.

Renderers:

* ``live``: a rich display on stderr, a bar per stage (images, images/s, ETA; a global stage's
  bar counts the tasks of its current step) under a bar for the whole run;
* ``lines``: one line per stage every ``interval`` seconds while it runs and one when it ends,
  for logs, CI and Ray job output (no terminal, so nothing redraws);
* ``off``: nothing (library use; status.json is still updated).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

MODES = ("auto", "live", "lines", "off")


@dataclass
class StageProgress:
    name: str
    position: int  # 1-based position of the stage in the run
    unit: str  # "images" or "tasks"
    total: int | None
    done: int = 0
    resumed: int = 0  # done before this attempt: excluded from the rate
    shards: int = 0
    shards_done: int = 0
    started: float = field(default_factory=time.monotonic)
    step: str | None = None  # global stages: the step whose tasks are being counted
    steps: list[str] = field(default_factory=list)
    finished: bool = False
    stats: dict = field(default_factory=dict)

    def rate(self, now: float) -> float | None:
        secs = now - self.started
        new = self.done - self.resumed
        return new / secs if secs > 0 and new > 0 else None

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if rate is None or self.total is None:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def snapshot(self, now: float) -> dict:
        rate, eta = self.rate(now), self.eta(now)
        out = {
            "stage": self.name,
            "position": self.position,
            "unit": self.unit,
            "done": self.done,
            "total": self.total,
            "shards_done": self.shards_done,
            "shards": self.shards,
            "elapsed_seconds": round(now - self.started, 1),
            "rate_per_second": None if rate is None else round(rate, 2),
            "eta_seconds": None if eta is None else round(eta, 1),
        }
        if self.step is not None:
            out["step"] = self.step
            out["step_index"] = step_position(self.step, self.steps)
            out["steps"] = len(self.steps) or None
        return out


def step_position(step: str, steps: list[str]) -> int | None:
    """1-based position of ``step`` among ``steps``; inner steps (``components.r2.star``) count
    as the step they belong to."""
    for i, s in enumerate(steps, start=1):
        if step == s or step.startswith(f"{s}."):
            return i
    return None


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def describe(st: StageProgress, now: float, run_total: int) -> str:
    """One line: where the stage stands, its rate and ETA, and the run's position."""
    unit = st.unit
    if st.total:
        pct = f" {100 * st.done / st.total:5.1f}%"
        count = f"{st.done:,}/{st.total:,} {unit}{pct}"
    else:
        count = f"{st.done:,} {unit}"
    rate = st.rate(now)
    speed = f"{rate:,.0f} {unit}/s" if rate is not None and rate >= 10 else (f"{rate:.2f} {unit}/s" if rate else f"- {unit}/s")
    step = ""
    if st.step is not None:
        pos = step_position(st.step, st.steps)
        idx = f" {pos}/{len(st.steps)}" if pos else ""
        step = f" step{idx} {st.step}:"
    return (
        f"{st.name}:{step} {count}, {speed}, ETA {clock(st.eta(now))}, "
        f"elapsed {clock(now - st.started)} (stage {st.position}/{run_total})"
    )


def describe_snapshot(snap: dict) -> str:
    """``describe`` for a status.json ``current`` entry (``curate status --run``)."""
    total, done, unit = snap.get("total"), snap.get("done", 0), snap.get("unit", "images")
    count = f"{done:,}/{total:,} {unit} ({100 * done / total:.1f}%)" if total else f"{done:,} {unit}"
    step = f" step {snap['step_index'] or '?'}/{snap['steps'] or '?'} {snap['step']}:" if snap.get("step") else ""
    rate = snap.get("rate_per_second")
    return (f"{snap['stage']}:{step} {count}, {f'{rate:,.1f}' if rate else '-'} {unit}/s, ETA {clock(snap.get('eta_seconds'))}, "
            f"shards {snap.get('shards_done', 0):,}/{snap.get('shards', 0):,}")


def finished_line(st: StageProgress, now: float, run_total: int) -> str:
    s = st.stats
    dropped = sum((s.get("dropped") or {}).values())
    secs = float(s.get("wall_seconds") or s.get("seconds") or (now - st.started))
    extra = f", {s['execution'].replace('_', ' ')}" if s.get("execution") else ""
    extra += ", done by an earlier attempt" if s.get("resumed") else ""
    return (
        f"{st.name}: done, {s.get('in', 0):,} in, {s.get('out', 0):,} out, {dropped:,} dropped in "
        f"{clock(secs)}{extra} (stage {st.position}/{run_total})"
    )


class RunProgress:
    """The run's position; the executor calls the ``stage_*``/``step``/``advance`` methods."""

    def __init__(
        self,
        stages: list[str],
        mode: str = "auto",
        interval: float = 30.0,
        stream: TextIO | None = None,
        on_status: Callable[[dict], None] | None = None,
        status_interval: float = 2.0,
    ):
        self.stream = stream or sys.stderr
        self.stages = list(stages)
        self.mode = resolve_mode(mode, self.stream)
        self.interval = interval
        self.on_status = on_status
        self.status_interval = status_interval
        self.current: StageProgress | None = None
        self.run_started = time.monotonic()
        self._last_status = 0.0
        self._lock = threading.RLock()
        self.renderer = {"live": LiveRenderer, "lines": LineRenderer}.get(self.mode, NullRenderer)(self)

    # -- reports from the executor ---------------------------------------------------------
    def stage_started(self, name: str, total: int | None, unit: str = "images", done: int = 0, shards: int = 0, shards_done: int = 0) -> None:
        with self._lock:
            pos = self.stages.index(name) + 1 if name in self.stages else len(self.stages)
            self.current = StageProgress(name, pos, unit, total, done, done, shards, shards_done)
            self.renderer.stage_started(self.current)
        self._status(force=True)

    def steps(self, name: str, steps: list[str]) -> None:
        """The steps a global stage will take (partitioned: its map/shuffle/reduce steps)."""
        with self._lock:
            if self.current and self.current.name == name:
                self.current.steps = list(steps)

    def step(self, name: str, step: str, total: int, done: int = 0) -> None:
        """A global stage starts ``step`` with ``total`` tasks, ``done`` of them already done."""
        with self._lock:
            st = self.current
            if st is None or st.name != name:
                return
            st.step, st.unit, st.total, st.done, st.resumed = step, "tasks", total, done, done
            st.started = time.monotonic()
            self.renderer.step(st)
        self._status(force=True)

    def advance(self, name: str, n: int = 1, shards: int = 0) -> None:
        with self._lock:
            st = self.current
            if st is None or st.name != name:
                return
            st.done += n
            st.shards_done += shards
            self.renderer.advance(st)
        self._status()

    def stage_finished(self, name: str, stats: dict) -> None:
        with self._lock:
            st = self.current
            if st is None or st.name != name:
                st = StageProgress(name, self.stages.index(name) + 1 if name in self.stages else 0, "images", None)
            st.finished, st.stats = True, stats
            if st.total is not None and st.unit == "images":
                st.done = st.total
            self.renderer.stage_finished(st)
            self.current = None

    def note(self, text: str) -> None:
        """A line of its own (the dashboard's address), in any mode but ``off``."""
        with self._lock:
            self.renderer.note(text)

    def snapshot(self) -> dict | None:
        with self._lock:
            return None if self.current is None else self.current.snapshot(time.monotonic())

    def close(self) -> None:
        """Stop the display (idempotent)."""
        renderer, self.renderer = self.renderer, NullRenderer(self)
        renderer.close()

    def _status(self, force: bool = False) -> None:
        if self.on_status is None:
            return
        now = time.monotonic()
        if not force and now - self._last_status < self.status_interval:
            return
        self._last_status = now
        snap = self.snapshot()
        if snap is not None:
            self.on_status(snap)


def resolve_mode(mode: str | bool, stream: TextIO) -> str:
    if mode is True:
        mode = "auto"
    if mode is False or mode is None:
        mode = "off"
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "live" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


class NullRenderer:
    def __init__(self, progress: RunProgress):
        self.progress = progress

    def stage_started(self, st: StageProgress) -> None: ...

    def step(self, st: StageProgress) -> None: ...

    def advance(self, st: StageProgress) -> None: ...

    def stage_finished(self, st: StageProgress) -> None: ...

    def note(self, text: str) -> None: ...

    def close(self) -> None: ...


class LineRenderer(NullRenderer):
    """A line when a stage starts, every ``interval`` seconds while it runs (a timer, so a shard
    that takes longer than the interval still produces lines) and when it ends."""

    def __init__(self, progress: RunProgress):
        super().__init__(progress)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="curation-progress", daemon=True)
        self._thread.start()

    def _print(self, text: str) -> None:
        print(f"curate: {text}", file=self.progress.stream, flush=True)
        self._last = time.monotonic()

    def stage_started(self, st: StageProgress) -> None:
        what = f"{st.total:,} {st.unit}" if st.total is not None else "global stage"
        shards = f" in {st.shards:,} shard(s)" if st.shards else ""
        shards = f" over {st.shards:,} shard(s)" if st.total is None and st.shards else shards
        resumed = f", {st.done:,} done before" if st.done else ""
        self._print(f"{st.name}: started, {what}{shards}{resumed} (stage {st.position}/{len(self.progress.stages)})")

    def note(self, text: str) -> None:
        self._print(text)

    def step(self, st: StageProgress) -> None:
        if time.monotonic() - self._last >= self.progress.interval:
            self._print(describe(st, time.monotonic(), len(self.progress.stages)))

    def stage_finished(self, st: StageProgress) -> None:
        self._print(finished_line(st, time.monotonic(), len(self.progress.stages)))

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, max(0.02, self.progress.interval / 4))):
            with self.progress._lock:
                st = self.progress.current
                if st is not None and time.monotonic() - self._last >= self.progress.interval:
                    self._print(describe(st, time.monotonic(), len(self.progress.stages)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class LiveRenderer(NullRenderer):
    """rich: a bar for the run (stages done) and one per stage, redrawn in place."""

    def __init__(self, progress: RunProgress):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        super().__init__(progress)
        self.bars = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]:<7}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(file=progress.stream),
            refresh_per_second=4,
        )
        self.run_task = self.bars.add_task("run", total=len(progress.stages), unit="stages", info="")
        self.tasks: dict[str, int] = {}
        self.bars.start()

    def _info(self, st: StageProgress) -> str:
        now = time.monotonic()
        rate = st.rate(now)
        speed = f"{rate:,.1f} {st.unit}/s" if rate is not None else f"- {st.unit}/s"
        return f"{speed}  ETA {clock(st.eta(now))}"

    def _label(self, st: StageProgress) -> str:
        if st.step is None:
            return st.name
        pos = step_position(st.step, st.steps)
        idx = f"{pos}/{len(st.steps)} " if pos else ""
        return f"{st.name} · {idx}{st.step}"[:28]

    def note(self, text: str) -> None:
        self.bars.console.print(text)

    def stage_started(self, st: StageProgress) -> None:
        self.tasks[st.name] = self.bars.add_task(st.name, total=st.total, completed=st.done, unit=st.unit, info=self._info(st))
        self.bars.update(self.run_task, info=f"stage {st.position}/{len(self.progress.stages)}: {st.name}")

    def step(self, st: StageProgress) -> None:
        self.bars.update(self.tasks[st.name], description=self._label(st), total=st.total, completed=st.done, unit=st.unit, info=self._info(st))

    def advance(self, st: StageProgress) -> None:
        if st.name in self.tasks:
            self.bars.update(self.tasks[st.name], completed=st.done, info=self._info(st))

    def stage_finished(self, st: StageProgress) -> None:
        if st.name not in self.tasks:
            self.tasks[st.name] = self.bars.add_task(st.name, total=1, completed=0, unit="", info="")
        s = st.stats
        dropped = sum((s.get("dropped") or {}).values())
        total = s.get("in", st.total or 1) or 1
        info = f"{s.get('out', 0):,} kept, {dropped:,} dropped" + (f" ({s['execution'].replace('_', ' ')})" if s.get("execution") else "")
        self.bars.update(self.tasks[st.name], description=st.name, total=total, completed=total, unit="images", info=info)
        self.bars.advance(self.run_task)

    def close(self) -> None:
        self.bars.stop()
