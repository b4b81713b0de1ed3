"""A run folder's lease: one driver at a time writes a run folder (local disk or S3).

    <run>/_lease.json   {"owner": "host:pid", "token": ..., "taken": t, "renewed": t}

The driver takes the lease before its first write and releases it at the end; a background thread
renews it every `RENEW_S` seconds. A second driver is refused with the owner's name. A lease whose
owner is a process of this machine that no longer exists is taken over (a killed driver, then a
re-run); any other lease is broken only when asked (`--break-lease`), because its owner may be alive
on another machine. Taking is exclusive on local disk (O_EXCL); on S3 it is a conditional PUT where the
server supports one, and always a read back of the token, so two drivers racing see one winner.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from edc_ray.storage import fsio

LEASE_FILE = "_lease.json"
RENEW_S = 10.0
STALE_S = 60.0  # a lease not renewed for this long is reported as stale (its driver is likely gone)
SETTLE_S = 0.5  # on an object store, wait this long before reading the lease back


class RunFolderBusy(RuntimeError):
    """The run folder is leased by another driver; the message names it and says how to break it."""


@dataclass
class LeaseRecord:
    """What `_lease.json` holds."""

    owner: str
    token: str
    taken: float
    renewed: float

    def alive_here(self) -> bool | None:
        """Whether the owner process is alive, when it ran on this machine (None: another machine)."""
        host, _, pid = self.owner.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def _read(url: str) -> LeaseRecord | None:
    try:
        return LeaseRecord(**json.loads(fsio.read_bytes(url)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise RunFolderBusy(f"{url} is not a lease file this version wrote ({err}); remove it if no driver "
                            "is using the run folder") from None


class RunLease:
    """The lease of one run folder, held by this process from `acquire` to `release`."""

    def __init__(self, run_root: str):
        self.url = fsio.join(run_root, LEASE_FILE)
        self.record = LeaseRecord(f"{socket.gethostname()}:{os.getpid()}", uuid.uuid4().hex, 0.0, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease is no longer ours, set by the renewing thread

    def _payload(self) -> bytes:
        return json.dumps(self.record.__dict__, sort_keys=True).encode()

    def acquire(self, break_lease: bool = False) -> None:
        """Take the lease or raise `RunFolderBusy` naming its owner; starts the renewing thread."""
        self.record.taken = self.record.renewed = time.time()
        if not fsio.create_exclusive(self.url, self._payload()):
            current = _read(self.url)
            if current is not None and not (break_lease or current.alive_here() is False):
                age = time.time() - current.renewed
                stale = f", which looks stale (no renewal for over {STALE_S:.0f} s)" if age > STALE_S else ""
                raise RunFolderBusy(
                    f"run folder {self.url.rsplit('/', 1)[0]} is in use by driver {current.owner} (lease "
                    f"renewed {age:.0f} s ago{stale}); wait for it to finish, choose another output.run_dir, "
                    f"or, if that driver is gone, re-run with --break-lease")
            fsio.atomic_write_bytes(self.url, self._payload())
        # the last writer of a take-over (or of an object store's PUT) wins: read back who that was
        time.sleep(SETTLE_S if "://" in self.url else 0.0)
        current = _read(self.url)
        if current is None or current.token != self.record.token:
            raise RunFolderBusy(f"run folder {self.url.rsplit('/', 1)[0]} was taken by driver "
                                f"{current.owner if current else '?'} at the same time; choose another "
                                "output.run_dir or wait for it to finish")
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                current = _read(self.url)
                if current is None or current.token != self.record.token:
                    self.lost = f"the lease {self.url} was taken by {current.owner if current else 'nobody'}"
                    return
                self.record.renewed = time.time()
                fsio.atomic_write_bytes(self.url, self._payload())
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried; the lease stays ours
                print(f"[edc-ray] could not renew {self.url}: {type(err).__name__}: {err}", flush=True)

    def check(self) -> None:
        """Raise `RunFolderBusy` if another driver took the lease since (checked between stages)."""
        if self.lost:
            raise RunFolderBusy(f"stopping: {self.lost} while this driver was running")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = _read(self.url)
        except RunFolderBusy:
            return
        if current is not None and current.token == self.record.token:
            fsio.remove(self.url)
