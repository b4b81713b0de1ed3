"""Small fsspec helpers so that a local folder and an ``s3://bucket/prefix`` root work the same way.

Every dataset or run path in edc-ray goes through these functions (never ``open`` / ``os.path``), so the
object-store semantics (no real directories, atomic single PUTs) are handled in one place.
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem


def _fs(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path inside it."""
    return fsspec.core.url_to_fs(url)


def join(root: str, *parts: str) -> str:
    """Join ``parts`` onto ``root`` with ``/``, for local paths and URLs (``s3://b/p``) alike."""
    tail = [p.strip("/") for p in parts if p.strip("/")]
    head = root.rstrip("/") or root  # keeps a bare "/" (filesystem root) as it is
    if head in ("", "/"):
        return head + "/".join(tail)
    return "/".join([head, *tail])


def absolute(url: str) -> str:
    """``url`` with a relative local path made absolute (Ray workers do not share the driver's cwd); URLs as is."""
    fs, path = _fs(url)
    return path if isinstance(fs, LocalFileSystem) and "://" not in url else url


def basename(url: str) -> str:
    """The last component of a path or URL (``s3://b/data/mnist/`` -> ``mnist``)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def exists(url: str) -> bool:
    """Whether a file or folder exists at ``url``."""
    fs, path = _fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    """The whole content of the file at ``url``."""
    fs, path = _fs(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    """The JSON document stored at ``url``."""
    return json.loads(read_bytes(url))


def list_files(url_dir: str, pattern: str = "*") -> list[str]:
    """URLs of the files directly inside ``url_dir`` whose names match the glob ``pattern``, sorted by name."""
    fs, path = _fs(url_dir)
    matches = fs.glob(f"{path.rstrip('/')}/{pattern}", detail=True)
    names = [basename(p) for p, entry in matches.items() if entry["type"] == "file"]
    return [join(url_dir, name) for name in sorted(names)]


def list_dirs(url_dir: str) -> list[str]:
    """Names of the folders directly inside ``url_dir``, sorted (empty when ``url_dir`` does not exist)."""
    fs, path = _fs(url_dir)
    if not fs.isdir(path):
        return []
    entries = fs.ls(path, detail=True)
    return sorted(basename(e["name"]) for e in entries if e["type"] == "directory")


def open_file(url: str, mode: str = "rb", compression: str | None = None) -> IO[bytes]:
    """Open ``url`` as a file object (use as a context manager); ``compression="gzip"`` decompresses on the fly."""
    return fsspec.open(url, mode, compression=compression).open()


def remove(url: str) -> None:
    """Delete the file at ``url`` if it exists."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm_file(path)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a half-written file under that name.

    Locally the bytes go to ``<name>.tmp-<uuid>`` in the same folder, which is then renamed over the final
    name (a rename within one filesystem is atomic); on a failure the temporary file is removed. Object
    stores get a single PUT, which is atomic by itself.
    """
    fs, path = _fs(url)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
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


def atomic_write_json(url: str, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically to ``url``."""
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(url, text.encode("utf-8"))


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """A webdataset ``gopen`` handler that opens any fsspec URL (``bufsize`` is webdataset's, unused)."""
    return fsspec.open(url, mode, **kw).open()


def register_wds_fsspec_opener() -> None:
    """Let webdataset read shards from ``s3://`` and the other fsspec schemes it has no opener for.

    webdataset 1.0.2 opens local paths itself and looks other schemes up in ``webdataset.gopen.gopen_schemes``
    (which knows http/pipe/gs/hf/ais but not s3). Schemes it already handles are kept; calling this again is a
    no-op. Call it in every process that reads shards (Ray workers included).
    """
    # the package re-exports a *function* named gopen, which shadows the module of the same name
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes
    for scheme in fsspec.available_protocols():
        schemes.setdefault(scheme, _fsspec_gopen)


def absolute(url: str) -> str:
    """Local paths made absolute (Ray workers run in other folders); URLs unchanged."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))
