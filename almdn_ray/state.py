"""The run's state record (``state.json``) and its lease (``lease.json``), both in run storage."""

from __future__ import annotations

import json
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
    token: int = 0  # the fencing token of the lease of the driver that wrote this state

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


def save_state(run: str, state: RunState, lease: Lease | None = None) -> None:
    """Replace ``state.json`` in one atomic write; with ``lease``, a fenced commit: only while this driver
    holds the lease, stamped with its token, and never over a state a later token wrote."""
    if lease is not None:
        lease.check()
        stored = storage.read_json(state_uri(run)) if storage.exists(state_uri(run)) else {}
        if int(stored.get("token", 0)) > int(lease.token):
            raise LeaseLost(
                f"{state_uri(run)} was written by a driver with token {stored['token']} > this driver's "
                f"{lease.token}; stopped before committing"
            )
        state.token = int(lease.token)
    storage.write_json(state_uri(run), asdict(state))


class LeaseError(RuntimeError):
    """Another driver owns the run."""


class LeaseLost(LeaseError):
    """This driver's lease was taken over: it stops before its next commit."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _machine() -> str:
    """This machine and process namespace: two containers with one hostname differ here (boot id, pid
    namespace), so a live driver in another container is never taken for a dead process of this one."""
    parts = [socket.gethostname()]
    try:
        parts.append(open("/proc/sys/kernel/random/boot_id").read().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return ":".join(parts)


DEFAULT_TTL_S = float(os.environ.get("ALMDN_RAY_LEASE_TTL_S", "60"))


class Lease:
    """One driver per run, fenced: ``lease.json`` names the owner and a fencing token.

    Acquired by a conditional write (S3 ``If-None-Match`` / ``If-Match``; a lock on local disk), so two
    drivers starting together cannot both win; each acquisition takes the next token. The owner renews it
    (a conditional write again) every ``ttl_s / 3``; another driver judges it expired when it has seen no
    renewal for ``ttl_s`` on its own clock (clocks of two machines are never compared), or at once when the
    owner is a dead process of this same machine. A driver checks its lease (:meth:`check`) before every
    commit and stops with :class:`LeaseLost` when it was taken. Released leases stay, unowned, so tokens keep
    increasing.
    """

    def __init__(self, run: str, *, ttl_s: float | None = None):
        self.uri = storage.join(run, "lease.json")
        self.ttl_s = ttl_s if ttl_s is not None else DEFAULT_TTL_S
        self.host, self.pid, self.machine = socket.gethostname(), os.getpid(), _machine()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.token: int | None = None
        self._version: str | None = None
        self._renewals = 0
        self._lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, token: int, owner: str | None) -> bytes:
        self._renewals += 1
        record = {
            "owner": owner, "token": token, "host": self.host, "pid": self.pid, "machine": self.machine,
            "ttl_s": self.ttl_s, "renewal": self._renewals, "nonce": uuid.uuid4().hex,
        }  # fmt: skip
        return json.dumps(record).encode()

    def _read(self) -> tuple[dict, str] | None:
        got = storage.read_versioned(self.uri)
        return (json.loads(got[0]), got[1]) if got is not None else None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseError` when a live driver holds it (one that renews it)."""
        watched: tuple[str, float] | None = None  # (version first seen, when) of another owner's lease
        while True:
            current = self._read()
            if current is None:
                if storage.create_exclusive(self.uri, self._record(1, self.owner)):
                    return self._won(1)
                continue
            held, version = current
            token = int(held.get("token", 0)) + 1
            other = held.get("owner")
            if other is not None and other != self.owner:
                dead_here = held.get("machine") == self.machine and not _alive(int(held.get("pid", -1)))
                if not dead_here:
                    now = time.monotonic()
                    if watched is not None and watched[0] != version:
                        raise LeaseError(
                            f"{self.uri}: the run is owned by driver {other} (token {held.get('token')}), which "
                            "is renewing its lease; stop that driver, or wait for it to finish"
                        )
                    if watched is None:
                        watched = (version, now)
                    ttl = float(held.get("ttl_s", self.ttl_s))
                    if now - watched[1] < ttl:
                        time.sleep(min(0.25, ttl / 12))
                        continue
                    logger.warning("taking over the lease of %s: no renewal for %.0f s", other, ttl)
                else:
                    logger.warning("taking over the lease of %s (its process is gone)", other)
            if storage.replace_if(self.uri, self._record(token, self.owner), version):
                return self._won(token)
            watched = None  # it changed under us: look again

    def _won(self, token: int) -> None:
        self.token = token
        self._version = storage.read_versioned(self.uri)[1]
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease-heartbeat")
        self._thread.start()
        logger.info("lease %s taken with token %d", self.uri, token)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                if self._lost or self._stop.is_set():
                    return
                try:
                    if not storage.replace_if(self.uri, self._record(self.token, self.owner), self._version):
                        current = self._read()
                        if current and (current[0].get("owner"), current[0].get("token")) == (self.owner, self.token):
                            # still ours: an earlier renewal landed though it failed here (its answers were lost
                            # on every attempt), so the version we held is stale; renew from the one stored
                            self._version = current[1]
                            continue
                        self._lost = True
                        logger.error("lease %s was taken over: this driver stops before its next commit", self.uri)
                        return
                    self._version = storage.read_versioned(self.uri)[1]
                except OSError as error:
                    logger.warning("could not renew the lease %s: %s", self.uri, error)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this driver still holds the lease with its token."""
        current = self._read()
        held = current[0] if current else {}
        if self._lost or held.get("owner") != self.owner or held.get("token") != self.token:
            self._lost = True
            raise LeaseLost(
                f"{self.uri}: this driver's lease (token {self.token}) was taken by {held.get('owner')} (token "
                f"{held.get('token')}); stopped before committing. The other driver carries the run on"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._lost or self.token is None:
                return
            try:
                storage.replace_if(self.uri, self._record(self.token, None), self._version)
            except OSError as error:
                logger.warning("could not release the lease %s: %s", self.uri, error)
