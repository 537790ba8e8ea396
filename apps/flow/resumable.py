"""What a long computation needs to run in pieces across commands that may be stopped: a time
budget checked between pieces of work (:class:`Budget`, :class:`Stopped`), a subprocess stopped
cleanly at the budget (:func:`run_stoppable`), and a store of fingerprinted result rows, each computed
under its own writer lock (:class:`Rows`). Used by :mod:`pgraft.apps.flow.protocol`."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pgraft.core.integrity import exclusive
from pgraft.core.state import read_json, write_sealed_json


class Budget:
    """Seconds left of ``--budget`` (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def over(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


class Stopped(Exception):
    """The budget ran out before the stage finished (rerun to continue)."""


def run_stoppable(cmd: list[str], budget: Budget, what: str, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` (output passes through); at the budget send it SIGTERM (the flow commands stop
    cleanly: shards are whole, training checkpoints), then raise :class:`Stopped`."""
    import signal

    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        left = budget.left()
        return proc.wait(timeout=None if left is None else max(1.0, left))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the whole group: torchrun and its workers
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise Stopped(f"stopped {what} at the budget") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise


class Rows:
    """One JSON per evaluated configuration in ``out/rows``, reused while its fingerprint matches.

    Several processes may share a run directory (e.g. one evaluating the base curve while another
    waits for the corrector): each row is computed under its own writer lock (:meth:`claim`), and a
    process skips a row another one holds, as :func:`run_cells` does with its cells."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "rows"

    def claim(self, key: str):
        """Context manager holding ``key``'s writer lock; raises RunDirLocked if another process has it."""
        return exclusive(self.dir / ".locks" / key)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        """``key``'s saved ``{"fingerprint", "row"}`` (None when there is none yet); a damaged file is
        refused in one line naming it (:func:`~pgraft.core.state.read_json`)."""
        p = self.path(key)
        return read_json(p, keys=("fingerprint", "row")) if p.is_file() else None

    def get(self, key: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        saved = self.load(key)
        if saved is None:
            return None
        return saved["row"] if saved["fingerprint"] == json.loads(json.dumps(fingerprint)) else None

    def put(self, key: str, fingerprint: dict[str, Any], row: dict[str, Any]) -> None:
        """Save ``key``'s row, sealed (:func:`~pgraft.core.state.write_sealed_json`): a digit changed
        later is refused when the row is read, not reported."""
        write_sealed_json(self.path(key), {"fingerprint": fingerprint, "row": row})

    def all(self) -> list[dict[str, Any]]:
        return [read_json(p, keys=("row",))["row"] for p in sorted(self.dir.glob("*.json"))]
