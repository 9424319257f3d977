"""Storage through ``pyarrow.fs``: local paths, ``file://`` and ``s3://bucket/key`` URIs.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) or an endpoint
(S3-compatible stores: MinIO, Ceph, moto): given per call, or for the whole process with :func:`configure`
(the driver does it with the job's ``storage.endpoint``, every Ray worker with the value the driver passes
it). pyarrow does not read the endpoint variables itself, so this module passes them on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import posixpath
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError", "configure", "configured_endpoint", "resolve", "join", "read_bytes", "write_bytes", "exists",
    "list_files", "is_remote",
    "read_json", "write_json", "read_parquet", "write_parquet", "delete",
]  # fmt: skip


class StorageError(OSError):
    """A storage URI could not be read or written; the message names the URI and what to check."""


_ENDPOINT: str | None = None


def configure(*, endpoint: str | None) -> None:
    """Set the S3 endpoint every call of this process uses when it names none (None: the AWS variables)."""
    global _ENDPOINT
    _ENDPOINT = endpoint or None


def configured_endpoint() -> str | None:
    """The endpoint set by :func:`configure` (what a driver hands on to its Ray workers)."""
    return _ENDPOINT


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


@lru_cache(maxsize=16)
def _s3(endpoint: str | None, access_key: str | None, secret_key: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key)
    return pafs.S3FileSystem(**kwargs)


def _endpoint_and_region(endpoint: str | None) -> tuple[str | None, str]:
    """The S3 endpoint (argument, else :func:`configure`'s, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)
    and region (``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1)."""
    env = os.environ
    endpoint = endpoint or _ENDPOINT or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    return endpoint, env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def resolve(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a URI.

    Args:
        uri: a local path, ``file:///abs/path`` or ``s3://bucket/key``.
        endpoint: S3 endpoint URL (overrides the :func:`configure`d one, which overrides
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
    """
    uri = str(uri)
    if is_remote(uri):
        endpoint, region = _endpoint_and_region(endpoint)
        env = os.environ
        fs = _s3(endpoint, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), region)
        return fs, uri.removeprefix("s3://").rstrip("/")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (object-store keys) or the OS separator (local paths)."""
    uri = str(uri)
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def _explain(uri: str, error: Exception) -> StorageError:
    text = str(error)
    key = text.lower().replace("_", "")  # pyarrow says NO_SUCH_BUCKET, S3 says NoSuchBucket
    if "nosuchbucket" in key or "bucket does not exist" in key:
        hint = "the bucket does not exist: create it or fix the bucket name"
    elif any(word in key for word in ("accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")):
        hint = "credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif "curl" in text.lower() or "connect" in text.lower():
        hint = "the endpoint could not be reached: check AWS_ENDPOINT_URL / storage.endpoint and the network"
    else:
        hint = "check the path and its permissions"
    return StorageError(f"{uri}: {hint} ({text.strip().splitlines()[0] if text.strip() else type(error).__name__})")


def read_bytes(uri: str, *, endpoint: str | None = None) -> bytes:
    """The whole content of a file."""
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri} does not exist") from error
    except OSError as error:
        if isinstance(error, IsADirectoryError) or "is a directory" in str(error).lower():
            raise StorageError(f"{uri} is a folder, not a file") from error
        raise _explain(uri, error) from error


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems do not sync directories
    finally:
        os.close(descriptor)


def write_bytes(uri: str, data: bytes, *, endpoint: str | None = None) -> None:
    """Write a file atomically: readers see the old content or the new, never a part.

    Local files are written to a temporary file beside the target, synced, given the umask's mode (0644
    by default) and renamed over it, and the folder is synced; an object store PUT replaces the object in one
    step.
    """
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())  # the bytes are on disk before the name points at them
                os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600: others sharing the storage read it
                os.replace(temporary, path)
                _fsync_folder(folder)  # and the rename survives a power loss
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
            return
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as error:
        raise _explain(uri, error) from error


# ---- conditional writes (the run's lease) ------------------------------------------------------------------
def _s3_client(endpoint: str | None):
    import boto3

    endpoint, region = _endpoint_and_region(endpoint)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@contextmanager
def _local_lock(path: str):
    """An exclusive ``flock`` on ``path.lock``: local compare-and-swap between processes."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_versioned(uri: str, *, endpoint: str | None = None) -> tuple[bytes, str] | None:
    """A file's bytes and a version tag that :func:`replace_if` checks (S3: the ETag), or None if absent."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        try:
            got = _s3_client(endpoint).get_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _explain(uri, OSError(str(error))) from error
        return got["Body"].read(), got["ETag"]
    _, path = resolve(uri)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def _conditional_put(uri: str, data: bytes, version: str | None, endpoint: str | None) -> bool:
    """Write ``data`` only if the file is absent (``version`` None) or still at ``version``."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            _s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                return False
            raise _explain(uri, OSError(str(error))) from error
        return True
    _, path = resolve(uri)
    with _local_lock(path):
        current = read_versioned(uri)
        if (current is None) != (version is None) or (current is not None and current[1] != version):
            return False
        write_bytes(uri, data)
        return True


def create_exclusive(uri: str, data: bytes, *, endpoint: str | None = None) -> bool:
    """Create a file unless it exists (S3 ``If-None-Match: *``; a local lock): True if this call created it."""
    return _conditional_put(uri, data, None, endpoint)


def replace_if(uri: str, data: bytes, version: str, *, endpoint: str | None = None) -> bool:
    """Replace a file only if it is still at ``version`` (S3 ``If-Match``; a local lock): True if replaced."""
    return _conditional_put(uri, data, version, endpoint)


def read_json(uri: str, *, endpoint: str | None = None) -> Any:
    """Parse a JSON file; a malformed one is an error naming the URI and the position."""
    data = read_bytes(uri, endpoint=endpoint)
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise StorageError(
            f"{uri}: malformed JSON at line {error.lineno}, column {error.colno} ({error.msg})"
        ) from error


def write_json(uri: str, value: Any, *, endpoint: str | None = None) -> None:
    """Write JSON atomically (see :func:`write_bytes`)."""
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode(), endpoint=endpoint)


def read_parquet(
    uri: str, *, columns: list[str] | None = None, endpoint: str | None = None, filters: Any = None
) -> pa.Table:
    """Read a Parquet file straight from its filesystem (streamed, not copied into memory first); ``filters``
    (a ``pyarrow.compute`` expression) keeps the matching rows as they are read."""
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        # pre_buffer=False: decode column chunk by column chunk; halves the peak memory on big score files
        return pq.read_table(path, filesystem=fs, columns=columns, pre_buffer=False, filters=filters)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri} does not exist") from error
    except OSError as error:
        raise _explain(uri, error) from error


def write_parquet(uri: str, table: pa.Table, *, endpoint: str | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(uri, buffer.getvalue(), endpoint=endpoint)


def delete(uri: str, *, endpoint: str | None = None) -> None:
    """Delete a file or a folder tree; a missing one is fine."""
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as error:
        raise _explain(uri, error) from error


def exists(uri: str, *, endpoint: str | None = None) -> bool:
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as error:
        raise _explain(uri, error) from error


def list_files(uri: str, *, pattern: str = "*", endpoint: str | None = None) -> list[str]:
    """URIs of the files under a folder (recursively) whose name relative to it matches ``pattern``, sorted."""
    fs, path = resolve(uri, endpoint=endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri} does not exist") from error
    except OSError as error:
        raise _explain(uri, error) from error
    base = str(uri).rstrip("/")
    found = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(info.path, path)
        if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(posixpath.basename(relative), pattern):
            found.append(join(base, *relative.split("/")))
    return sorted(found)
