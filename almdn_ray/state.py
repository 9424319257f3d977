"""The run's state record (``state.json``) and its lease (``lease.json``), both in run storage."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from almdn_ray import storage

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "RunState", "load_state", "save_state", "LeaseError", "Lease"]

STAGES = ("train", "eval", "score", "select", "label")
STATE_VERSION = 1


@dataclass
class RunState:
    """Where a run is: ``cycle`` and the next ``stage`` to do; ``status`` running | awaiting_labels | finished.

    ``history`` lists every finished stage once: ``{"cycle", "stage", "finished_at", "seconds"}``.
    """

    run_id: str
    cycle: int = 0
    stage: str = "train"
    status: str = "running"
    history: list[dict] = field(default_factory=list)
    version: int = STATE_VERSION

    def done(self, stage: str, seconds: float, *, last_cycle: bool) -> None:
        """Record ``stage`` of the current cycle as finished and move to the next stage."""
        assert stage == self.stage, (stage, self.stage)
        self.history.append(
            {
                "cycle": self.cycle,
                "stage": stage,
                "seconds": round(seconds, 3),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        if stage == "eval" and last_cycle:
            self.stage, self.status = "done", "finished"
        elif stage == "label":
            self.cycle, self.stage = self.cycle + 1, "train"
        else:
            self.stage = STAGES[STAGES.index(stage) + 1]


def state_uri(run: str) -> str:
    return storage.join(run, "state.json")


def load_state(run: str) -> RunState | None:
    if not storage.exists(state_uri(run)):
        return None
    data = storage.read_json(state_uri(run))
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{state_uri(run)}: state version {data.get('version')} is not {STATE_VERSION}")
    return RunState(**data)


def save_state(run: str, state: RunState) -> None:
    """Replace ``state.json`` in one atomic write."""
    storage.write_json(state_uri(run), asdict(state))


class LeaseError(RuntimeError):
    """Another driver owns the run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """One driver per run: ``lease.json`` names the owner and an expiry that a heartbeat keeps renewing.

    A live lease of another driver is refused; an expired one, or one whose owner process on this same
    machine is gone (a crashed driver), is taken over.
    """

    def __init__(self, run: str, *, ttl_s: float = 60.0):
        self.uri = storage.join(run, "lease.json")
        self.ttl_s = ttl_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        storage.write_json(
            self.uri, {"owner": self.owner, "host": self.host, "pid": self.pid, "expires_at": time.time() + self.ttl_s}
        )

    def _current(self) -> dict | None:
        return storage.read_json(self.uri) if storage.exists(self.uri) else None

    def acquire(self) -> None:
        held = self._current()
        if held and held["owner"] != self.owner:
            left = held["expires_at"] - time.time()
            crashed = held.get("host") == self.host and not _alive(int(held.get("pid", -1)))
            if left > 0 and not crashed:
                until = datetime.fromtimestamp(held["expires_at"], UTC).isoformat(timespec="seconds")
                raise LeaseError(
                    f"{self.uri}: the run is owned by driver {held['owner']} until {until} "
                    f"({left:.0f} s from now); stop that driver or wait for its lease to expire"
                )
            logger.warning(
                "taking over the lease of %s (%s)", held["owner"], "its process is gone" if crashed else "expired"
            )
        self._write()
        time.sleep(0.2)
        held = self._current()
        if not held or held["owner"] != self.owner:
            raise LeaseError(f"{self.uri}: driver {held and held['owner']} took the run at the same moment")
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = self._current()
                if held and held["owner"] != self.owner:
                    logger.error("lease of %s was taken over by %s", self.uri, held["owner"])
                    return
                self._write()
            except OSError as error:
                logger.warning("could not renew the lease %s: %s", self.uri, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._current()
            if held and held["owner"] == self.owner:
                storage.delete(self.uri)
        except OSError as error:
            logger.warning("could not release the lease %s: %s", self.uri, error)
