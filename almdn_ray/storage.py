"""Storage through ``pyarrow.fs``: local paths, ``file://`` and ``s3://bucket/key`` URIs.

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``) or an endpoint
(S3-compatible stores: MinIO, Ceph, moto): given per call, or for the whole process with :func:`configure`
(the driver does it with the job's ``storage`` section, every Ray worker with the :func:`settings` the driver
passes it). pyarrow does not read the endpoint variables itself, so this module passes them on.

Transient S3 failures (503 SlowDown and other 5xx, connection resets, timeouts) are retried with exponential
backoff by the SDKs themselves: pyarrow's ``AwsStandardS3RetryStrategy`` and botocore's ``standard`` retry mode,
both with ``max_attempts`` attempts in all (the job's ``storage.max_attempts``, else ``AWS_MAX_ATTEMPTS``, else 10)
and the same connect and read timeouts. The pyarrow filesystem keeps these settings when it is pickled into a Ray
task (Ray Data's reads and writes, Ray Train's checkpoints), which pyarrow's own ``S3FileSystem`` does not.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "StorageError", "configure", "configured_endpoint", "settings", "resolve", "join", "read_bytes", "write_bytes",
    "exists", "list_files", "is_remote",
    "read_json", "write_json", "read_parquet", "write_parquet", "delete",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 10  # in all, the first included: about a minute of backoff before an error
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0


class StorageError(OSError):
    """A storage URI could not be read or written; the message names the URI and what to check."""


_SETTINGS: dict = {"endpoint": None, "max_attempts": None, "connect_timeout_s": None, "read_timeout_s": None}


def configure(
    *,
    endpoint: str | None,
    max_attempts: int | None = None,
    connect_timeout_s: float | None = None,
    read_timeout_s: float | None = None,
) -> None:
    """Set how every S3 call of this process reaches storage (each None: the AWS variables, else the default).

    Args:
        endpoint: used when a call names none (else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``).
        max_attempts: attempts per request, the first included (else ``AWS_MAX_ATTEMPTS``, else 10).
        connect_timeout_s: seconds to connect (else 10).
        read_timeout_s: seconds an attempt waits for the answer before it is retried (else 60).
    """
    _SETTINGS.update(
        endpoint=endpoint or None,
        max_attempts=max_attempts,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )


def configured_endpoint() -> str | None:
    """The endpoint set by :func:`configure`."""
    return _SETTINGS["endpoint"]


def settings(endpoint: str | None = None) -> dict:
    """This process's :func:`configure` arguments (``endpoint`` replacing the configured one when given): what a
    driver hands its Ray workers, which call ``configure(**settings)``, so that they retry as it does."""
    return {**_SETTINGS, "endpoint": endpoint or _SETTINGS["endpoint"]}


def _retries() -> tuple[int, float, float]:
    """(max_attempts, connect_timeout_s, read_timeout_s) as configured, else from the AWS variables and defaults."""
    attempts = _SETTINGS["max_attempts"]
    if attempts is None:
        text = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
        try:
            attempts = int(text) if text else DEFAULT_MAX_ATTEMPTS
        except ValueError:
            raise StorageError(f"AWS_MAX_ATTEMPTS={text!r} is not a whole number: set it to e.g. 10") from None
    connect = _SETTINGS["connect_timeout_s"] or DEFAULT_CONNECT_TIMEOUT_S
    return max(1, int(attempts)), float(connect), float(_SETTINGS["read_timeout_s"] or DEFAULT_READ_TIMEOUT_S)


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


class RetryingS3FileSystem(pafs.S3FileSystem):
    """``pyarrow.fs.S3FileSystem`` with the standard retry strategy, which it keeps when pickled into Ray tasks
    and Ray Train workers (pyarrow's own pickling drops ``retry_strategy``, so workers would retry 3 times)."""

    def __init__(self, *, max_attempts: int, **options):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self.max_attempts = max_attempts

    def __reduce__(self):
        _, (options,) = super().__reduce__()
        return _rebuild_s3, (self.max_attempts, options)


def _rebuild_s3(max_attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **options)


@lru_cache(maxsize=16)
def _s3(
    endpoint: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str,
    retries: tuple[int, float, float],
    session_token: str | None = None,
) -> RetryingS3FileSystem:
    max_attempts, connect_timeout_s, read_timeout_s = retries
    kwargs: dict = {"region": region, "connect_timeout": connect_timeout_s, "request_timeout": read_timeout_s}
    kwargs["allow_delayed_open"] = True  # a write of less than a part (10 MB) is then one PUT, not three requests
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key)
        if session_token:  # temporary credentials (assume-role, SSO): the key alone is refused
            kwargs["session_token"] = session_token
    return RetryingS3FileSystem(max_attempts=max_attempts, **kwargs)


def _endpoint_and_region(endpoint: str | None) -> tuple[str | None, str]:
    """The S3 endpoint (argument, else :func:`configure`'s, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``)
    and region (``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else us-east-1)."""
    env = os.environ
    endpoint = endpoint or _SETTINGS["endpoint"] or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
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
        keys = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        fs = _s3(endpoint, *keys, region, _retries(), env.get("AWS_SESSION_TOKEN"))
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
    elif "slowdown" in key or "reduce your request rate" in key or "(http status 503)" in key:
        hint = (
            f"S3 throttled every one of {_retries()[0]} attempts (503 SlowDown): lower the request rate (fewer "
            "scoring actors or decode tasks) or raise storage.max_attempts / AWS_MAX_ATTEMPTS"
        )
    elif any(word in key for word in ("curl", "connect", "reset", "timed out", "timeout", "network")):
        hint = (
            f"the endpoint could not be reached in {_retries()[0]} attempts: check AWS_ENDPOINT_URL / "
            "storage.endpoint and the network, or raise storage.max_attempts / AWS_MAX_ATTEMPTS"
        )
    else:
        hint = "check the path and its permissions"
    return StorageError(f"{uri}: {hint} ({text.strip().splitlines()[0] if text.strip() else type(error).__name__})")


def _retry_misread_throttling(read: Callable[[], Any]) -> Any:
    """``read()`` (a pyarrow read from S3), again after one failure that the AWS SDK does not retry itself.

    pyarrow reads a byte range into a buffer of that size; S3's 503 SlowDown answer carries an XML body of a few
    hundred bytes, which overflows the buffer of a smaller range (a small file, a Parquet column chunk of a few
    rows), and the SDK reports ``INTERNAL_FAILURE: Failed to flush response stream``, which it never retries
    (Ray Data retries it too: ``DataContext.retried_io_errors``). Only that error is retried here, with the
    configured attempts and a backoff like the SDK's; every other one has had the SDK's retries already.
    """
    attempts = _retries()[0]
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except OSError as error:
            if attempt == attempts or "Failed to flush response stream" not in str(error):
                raise
            logger.info("S3 read failed (%s); attempt %d of %d next", error, attempt + 1, attempts)
            time.sleep(random.random() * min(20.0, 2.0 ** (attempt - 1)))


def read_bytes(uri: str, *, endpoint: str | None = None, limit: int | None = None) -> bytes:
    """The whole content of a file, or its first ``limit`` bytes (one ranged read)."""
    fs, path = resolve(uri, endpoint=endpoint)

    def read() -> bytes:
        if limit is not None:
            with fs.open_input_file(path) as f:
                return f.read(limit)
        with fs.open_input_stream(path) as stream:
            return stream.read()

    try:
        return _retry_misread_throttling(read)
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
    step. That PUT is one request whatever the size (up to S3's 5 GB), never a multipart upload, so a retry of it
    after a lost answer is harmless: a repeated CompleteMultipartUpload is an error on MinIO, Ceph and moto.
    """
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_key(uri)
        try:
            _s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as error:
            raise _explain(uri, OSError(str(error))) from error
        return
    _, path = resolve(uri, endpoint=endpoint)
    try:
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
    except OSError as error:
        raise _explain(uri, error) from error


# ---- boto3: whole-object PUTs and conditional writes (the run's lease) --------------------------------------
def _s3_client(endpoint: str | None):
    """A boto3 S3 client (shared per settings: its retry quota is then the process's) with the retry settings."""
    endpoint, region = _endpoint_and_region(endpoint)
    env = os.environ
    credentials = tuple(env.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    return _boto3_client(endpoint, region, _retries(), credentials)


@lru_cache(maxsize=16)
def _boto3_client(endpoint: str | None, region: str, retries: tuple[int, float, float], credentials: tuple):
    import boto3
    from botocore.config import Config

    max_attempts, connect_timeout_s, read_timeout_s = retries
    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
    )
    del credentials  # a key of the cache only: boto3 reads them (variables, files, instance role) itself
    # a session of its own: boto3's default session is not safe to make clients from in two threads at once
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


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
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_key(uri)
        try:
            got = _s3_client(endpoint).get_object(Bucket=bucket, Key=key)
            return got["Body"].read(), got["ETag"]
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _explain(uri, OSError(str(error))) from error
        except BotoCoreError as error:  # connection errors and timeouts, after the retries
            raise _explain(uri, OSError(str(error))) from error
    _, path = resolve(uri)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return None
    return data, hashlib.sha256(data).hexdigest()


def _conditional_put(uri: str, data: bytes, version: str | None, endpoint: str | None) -> bool:
    """Write ``data`` only if the file is absent (``version`` None) or still at ``version``.

    On S3 the condition failing may mean this very call won: boto3 retries a PUT whose answer was lost (a reset
    or a timeout after S3 applied it), and the retry finds the condition broken by the first attempt. So on a
    failed condition the object is read back, and the call counts as a win when it holds exactly ``data``.
    That is sound when no other writer can write the same bytes: callers that race (the run's lease) put a
    nonce in every record. If another writer replaced the object between our first attempt and the read, the
    call counts as lost: the lease then looks again (acquire) or stops its driver (renewal), never two owners.
    """
    if is_remote(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _bucket_key(uri)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            _s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                stored = read_versioned(uri, endpoint=endpoint)
                if stored is not None and stored[0] == data:
                    logger.info("%s: a retried conditional write found its own first attempt applied", uri)
                    return True
                return False
            raise _explain(uri, OSError(str(error))) from error
        except BotoCoreError as error:
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
    """Create a file unless it exists (S3 ``If-None-Match: *``; a local lock): True if this call created it.

    ``data`` must be unique to the call (a nonce in it) when racing writers must learn who won: see
    :func:`_conditional_put`."""
    return _conditional_put(uri, data, None, endpoint)


def replace_if(uri: str, data: bytes, version: str, *, endpoint: str | None = None) -> bool:
    """Replace a file only if it is still at ``version`` (S3 ``If-Match``; a local lock): True if replaced.

    ``data`` must be unique to the call, as for :func:`create_exclusive`."""
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


WHOLE_READ_BYTES = 64 * 2**20  # an S3 Parquet file up to this size is fetched in one GET, then decoded


def read_parquet(
    uri: str, *, columns: list[str] | None = None, endpoint: str | None = None, filters: Any = None
) -> pa.Table:
    """Read a Parquet file straight from its filesystem (streamed, not copied into memory first); ``filters``
    (a ``pyarrow.compute`` expression) keeps the matching rows as they are read.

    An S3 file of up to :data:`WHOLE_READ_BYTES` is fetched in one GET and decoded from memory: fewer requests
    than one per column chunk, and none of the tiny ranged reads that a throttling 503 fails for good (see
    :func:`_retry_misread_throttling`).
    """
    fs, path = resolve(uri, endpoint=endpoint)

    def read() -> pa.Table:
        with fs.open_input_file(path) as file:
            source = pa.BufferReader(file.read()) if is_remote(uri) and file.size() <= WHOLE_READ_BYTES else file
            # pre_buffer=False: decode column chunk by column chunk; halves the peak memory on big score files
            return pq.read_table(source, columns=columns, pre_buffer=False, filters=filters)

    try:
        return _retry_misread_throttling(read)
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
