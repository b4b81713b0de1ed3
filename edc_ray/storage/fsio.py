"""Small fsspec helpers so that a local folder and an ``s3://bucket/prefix`` root work the same way.

Every dataset or run path in edc-ray goes through these functions (never ``open`` / ``os.path``), so the
object-store semantics (no real directories, atomic single PUTs) are handled in one place.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow.fs

S3_PROTOCOLS = ("s3", "s3a")
T = TypeVar("T")


# The environment a botocore client is built from: a change of any of these gets a new client.
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS",
                "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_s3_clients: dict[tuple, AbstractFileSystem] = {}


def _s3_filesystem() -> AbstractFileSystem:
    """The S3 filesystem for this process, thread (as fsspec keys its own cache) and AWS environment;
    S3 listings are never cached.

    s3fs caches directory listings per process and answers ``exists``/``info``/``open`` from them, so a
    driver that once listed ``<run>/distilled`` would not see the shards Ray workers wrote there since.
    Endpoint and credentials are deliberately not passed: botocore reads them from the standard AWS chain
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``, instance roles), in every process alike, and
    nothing secret ends up in a pickled filesystem. fsspec's own instance cache ignores that environment
    (a client made before ``AWS_ENDPOINT_URL`` changed would be reused), so clients are cached here by it.
    """
    key = (os.getpid(), threading.get_ident(), *(os.environ.get(name) for name in AWS_SETTINGS))
    fs = _s3_clients.get(key)
    if fs is None:
        fs = _s3_clients[key] = fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True)
    return fs


def _fs(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it."""
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in S3_PROTOCOLS:
        fs = _s3_filesystem()
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url)


def join(root: str, *parts: str) -> str:
    """Join ``parts`` onto ``root`` with ``/``, for local paths and URLs (``s3://b/p``) alike."""
    tail = [p.strip("/") for p in parts if p.strip("/")]
    head = root.rstrip("/") or root  # keeps a bare "/" (filesystem root) as it is
    if head in ("", "/"):
        return head + "/".join(tail)
    return "/".join([head, *tail])


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in other folders); URLs unchanged."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def is_local(url: str) -> bool:
    """Whether ``url`` is on this machine's file system (a plain path or ``file://``)."""
    return fsspec.core.split_protocol(url)[0] in (None, "file", "local")


def arrow_filesystem(url: str) -> tuple[pyarrow.fs.FileSystem | None, str]:
    """``url`` as pyarrow sees it (Ray Train's ``storage_filesystem`` and ``storage_path``).

    Local paths give ``(None, absolute path)``, so that pyarrow picks its own local filesystem. URLs give
    the fsspec filesystem that every other read and write uses, wrapped for pyarrow, and the path without
    the scheme: checkpoints then reach S3 through the same endpoint and credential chain as the shards.
    """
    if "://" not in url:
        return None, absolute(url)
    import pyarrow.fs  # only Ray Train needs it; pyarrow is slow to import

    fs, path = _fs(url)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def basename(url: str) -> str:
    """The last component of a path or URL (``s3://b/data/mnist/`` -> ``mnist``)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def _names_url(operation: Callable[..., T]) -> Callable[..., T]:
    """`operation(url, ...)` with an S3 refusal (s3fs raises a bare ``PermissionError("Forbidden")``)
    turned into one that names the URL and the likely cause."""
    @functools.wraps(operation)
    def named(url: str, *args: Any, **kwargs: Any) -> T:
        try:
            return operation(url, *args, **kwargs)
        except PermissionError as error:
            if fsspec.core.split_protocol(url)[0] not in S3_PROTOCOLS:  # a local error names its file already
                raise
            raise PermissionError(f"{url}: {error}; the AWS credentials of this environment may not use it "
                                  f"(AWS_ACCESS_KEY_ID / AWS_PROFILE / the instance role)") from error
    return named


@_names_url
def exists(url: str) -> bool:
    """Whether a file or folder exists at ``url``."""
    fs, path = _fs(url)
    return fs.exists(path)


@_names_url
def read_bytes(url: str) -> bytes:
    """The whole content of the file at ``url``."""
    fs, path = _fs(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    """The JSON document stored at ``url``."""
    return json.loads(read_bytes(url))


@_names_url
def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes ``start`` up to ``end`` (exclusive) of the file at ``url`` (one ranged GET on an object store)."""
    fs, path = _fs(url)
    return fs.cat_file(path, start=start, end=end)


def _entry_type(path: str, entry: dict) -> str:
    """An fsspec listing entry's type with local symbolic links followed ("file", "directory", ...).

    A link whose target does not exist raises `FileNotFoundError` naming both: a dataset folder with a
    dangling link is incomplete, and dropping the link silently would change the data."""
    if not entry.get("islink"):
        return entry["type"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is a symbolic link to {entry.get('destination')!r}, which does not exist")
    return "directory" if os.path.isdir(path) else "file" if os.path.isfile(path) else "other"


@_names_url
def list_files(url_dir: str, pattern: str = "*") -> list[str]:
    """URLs of the files directly inside ``url_dir`` whose names match the glob ``pattern``, sorted by name
    (local symbolic links followed)."""
    fs, path = _fs(url_dir)
    matches = fs.glob(f"{path.rstrip('/')}/{pattern}", detail=True)
    names = [basename(p) for p, entry in matches.items() if _entry_type(p, entry) == "file"]
    return [join(url_dir, name) for name in sorted(names)]


@_names_url
def list_dirs(url_dir: str) -> list[str]:
    """Names of the folders directly inside ``url_dir``, sorted (empty when ``url_dir`` does not exist;
    local symbolic links followed)."""
    fs, path = _fs(url_dir)
    if not fs.isdir(path):
        return []
    entries = fs.ls(path, detail=True)
    return sorted(basename(e["name"]) for e in entries if _entry_type(e["name"], e) == "directory")


@_names_url
def open_file(url: str, compression: str | None = None) -> IO[bytes]:
    """Open ``url`` for reading (use as a context manager); ``compression="gzip"`` decompresses on the fly.

    There is no write mode on purpose: fsspec commits a remote file on ``close()`` even when the writer
    failed halfway, so every write goes through :func:`atomic_write_bytes`.
    """
    fs, path = _fs(url)
    return fs.open(path, "rb", compression=compression)


@_names_url
def remove(url: str) -> None:
    """Delete the file at ``url`` if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm_file(path)


@_names_url
def remove_tree(url: str) -> None:
    """Delete the folder at ``url`` and everything below it, if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


PUT_ATTEMPTS = 5
PUT_BACKOFF_S = 0.5  # doubled after every failed attempt: 0.5 + 1 + 2 + 4 s before giving up


def _transient(error: BaseException) -> bool:
    """A network or server hiccup that a repeated (idempotent) PUT may get past."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, OSError):  # ConnectionError, TimeoutError, s3fs's translated errors
        return True
    from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    return isinstance(error, (BotoConnectionError, HTTPClientError))


def _with_retries(put, url: str) -> None:
    """Run `put` (one whole-object write), retrying transient errors with exponential backoff."""
    for attempt in range(1, PUT_ATTEMPTS + 1):
        try:
            put()
            return
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == PUT_ATTEMPTS or not _transient(error):
                raise
            wait = PUT_BACKOFF_S * 2 ** (attempt - 1)
            print(f"[edc-ray] write of {url} failed ({type(error).__name__}: {error}); "
                  f"retry {attempt}/{PUT_ATTEMPTS - 1} in {wait:.1f} s", flush=True)
            time.sleep(wait)


@_names_url
def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a half-written file under that name.

    Locally the bytes go to ``<name>.tmp-<uuid>`` in the same folder, which is then renamed over the final
    name (a rename within one filesystem is atomic); on a failure the temporary file is removed. Object
    stores get a single PUT, which is atomic by itself, repeated with backoff on transient errors.
    """
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        _with_retries(lambda: fs.pipe_file(path, data), url)
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise


@_names_url
def create_exclusive(url: str, data: bytes) -> bool:
    """Create the file `url` holding `data` only if it does not exist; False if it does.

    Local files are written to a temporary name and hard-linked to `url` (atomic, and fails if `url`
    exists, so no reader sees it half-written); object stores get a conditional PUT (If-None-Match),
    which servers without support for it treat as a plain PUT after the existence check, so callers
    that need exclusivity there read the file back.
    """
    fs, path = _fs(url)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    if fs.exists(path):
        return False
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as error:  # s3fs reports HTTP 412 (the object exists) as an OSError
        if "precondition" in f"{error} {error.__cause__!r}".lower().replace("-", ""):
            return False
        raise
    return True


def atomic_write_json(url: str, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically to ``url``."""
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(url, text.encode("utf-8"))
