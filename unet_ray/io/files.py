"""Files and URIs: local paths and s3:// URIs read, written, listed and checked. No Ray.

Every filesystem call goes through ``resolve_filesystem``, which gives a pyarrow filesystem and a
path for a URI. A custom S3 endpoint (MinIO, Ceph, a test server) is read from
``AWS_ENDPOINT_URL`` and passed explicitly, because pyarrow does not read that variable itself.

Local files are written whole (``write_bytes_atomic``: temp file + rename) with the permissions the
process's umask gives (0644 under umask 022), like any file the user's tools create.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DEFAULT_S3_REGION = "us-east-1"
S3_READ_THREADS = 16  # parallel GETs when one sample has many mask objects
NEW_FILE_MODE = 0o666  # the kernel applies the umask: 0644 under umask 022, 0640 under 027
TEMP_NAME_ATTEMPTS = 16  # random temp names tried before giving up
WRITE_PROBE_NAME = ".unet_ray_write_probe"  # hidden, so never listed as an input


# --------------------------------------------------------------------------------------------
# URIs and filesystems
# --------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def _s3_settings() -> tuple[str | None, str, str]:
    """(endpoint_override host[:port] or None, scheme, region) from the environment."""
    region = (
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_S3_REGION
    )
    endpoint_url = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint_url:
        return None, "https", region
    parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    return parsed.netloc, parsed.scheme or "https", region


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, scheme: str, region: str, access_key: str | None):
    # access_key is part of the cache key only, so changed credentials build a new filesystem
    del access_key
    if endpoint is None:
        return pafs.S3FileSystem(region=region)
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme, region=region)


def resolve_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_s3(uri):
        endpoint, scheme, region = _s3_settings()
        filesystem = _s3_filesystem(endpoint, scheme, region, os.environ.get("AWS_ACCESS_KEY_ID"))
        return filesystem, uri[len(S3_SCHEME) :].rstrip("/")
    return pafs.LocalFileSystem(), local_path(uri)


def fsspec_filesystem(uri: str):
    """An fsspec filesystem (s3fs with ``AWS_ENDPOINT_URL`` honoured, or local) and its path."""
    import fsspec

    uri = str(uri)
    if is_s3(uri):
        import s3fs

        options = {}
        if os.environ.get("AWS_ENDPOINT_URL"):
            options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        return s3fs.S3FileSystem(**options), uri[len(S3_SCHEME) :].rstrip("/")
    return fsspec.filesystem("file"), local_path(uri)


def local_path(uri: str) -> str:
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    return os.path.abspath(os.path.expanduser(uri))


def _to_uri(original: str, filesystem_path: str) -> str:
    return S3_SCHEME + filesystem_path if is_s3(original) else filesystem_path


def join_uri(base: str, *parts: str) -> str:
    base = str(base)
    if is_s3(base):
        pieces = [base.rstrip("/")] + [str(part).strip("/") for part in parts if str(part)]
        return "/".join(pieces)
    return os.path.join(base, *[str(part) for part in parts])


def read_bytes(uri: str) -> bytes:
    """All bytes of one file; FileNotFoundError names the URI when it does not exist.

    Read as a random-access file: one ranged GET for the whole S3 object. pyarrow's input
    *stream* fetches 256 KiB per request, one after the other (160 GETs for a 40 MB file; a
    138 MB model.pt took 60 s from a local moto server instead of under a second).
    """
    filesystem, path = resolve_filesystem(uri)
    try:
        with filesystem.open_input_file(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri}: no such file") from error
    except OSError as error:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: no such file") from error
        raise OSError(f"{uri}: cannot read ({error})") from error


def read_many_bytes(uris: list[str]) -> list[bytes]:
    """``read_bytes`` of each URI, in order; S3 objects are fetched by a few threads at once."""
    if len(uris) < 2 or not is_s3(uris[0]):
        return [read_bytes(uri) for uri in uris]
    with ThreadPoolExecutor(max_workers=min(S3_READ_THREADS, len(uris))) as executor:
        return list(executor.map(read_bytes, uris))


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole file so readers never see a partial one (local: temp file + rename).

    A local file gets the permissions of the process's umask, as ``open(path, "w")`` would give.
    """
    uri = str(uri)
    if is_s3(uri):
        filesystem, path = resolve_filesystem(uri)
        with filesystem.open_output_stream(path) as stream:  # one PUT: atomic on S3
            stream.write(data)
        return
    path = local_path(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temp_path = _create_temp_file(path)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            temp_file.write(data)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _create_temp_file(path: str) -> tuple[int, str]:
    """A new hidden file beside ``path``, open for writing: (descriptor, its path).

    Created with ``NEW_FILE_MODE`` so the kernel applies the umask (``tempfile.mkstemp`` would
    make it 0600, and the rename would keep that).
    """
    folder, name = os.path.split(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(TEMP_NAME_ATTEMPTS):
        temp_path = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp_path, flags, NEW_FILE_MODE), temp_path
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: could not create a temporary file beside it")


def check_writable(uri: str) -> None:
    """Fail fast when an output location cannot be written: ValueError naming it and the problem.

    Creates and deletes a small probe file (``WRITE_PROBE_NAME``): locally in the folder, or in
    the nearest existing folder above it when it does not exist yet (so nothing is left behind);
    on S3 under the prefix, written as the outputs will be (a missing bucket, bad credentials or
    a denied PUT fail here).
    """
    uri = str(uri)
    if is_s3(uri):
        _check_s3_writable(uri)
    else:
        _check_local_writable(uri)


def _probe_name() -> str:
    return f"{WRITE_PROBE_NAME}.{secrets.token_hex(4)}"  # parallel jobs never share a probe


def _check_local_writable(uri: str) -> None:
    path = local_path(uri)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{uri}: cannot write output there: it is a file, not a folder")
    folder = path
    while not os.path.exists(folder):  # the nearest existing folder above it
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{uri}: cannot write output there: {folder} is a file, not a folder")
    probe = os.path.join(folder, _probe_name())
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
        os.remove(probe)
    except OSError as error:
        where = "" if folder == path else f" (creating it needs writing in {folder})"
        reason = error.strerror or str(error)
        raise ValueError(f"{uri}: cannot write output there{where}: {reason}") from error


def _check_s3_writable(uri: str) -> None:
    filesystem, path = resolve_filesystem(uri)
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{uri}: no bucket name; give s3://bucket/prefix")
    probe = f"{path}/{_probe_name()}"
    try:
        with filesystem.open_output_stream(probe) as stream:
            stream.write(b"unet_ray write probe\n")
    except OSError as error:
        reason = " ".join(str(error).split())
        raise ValueError(
            f"{uri}: cannot write output there ({reason}); check that bucket {bucket!r} exists "
            "and that your AWS credentials (and AWS_ENDPOINT_URL, if any) allow writing to it"
        ) from error
    # s3fs deletes: pyarrow's delete_file would leave a "prefix/" marker object behind (it keeps
    # the emptied "folder"); a probe that cannot be deleted stays, harmless and hidden
    with suppress(Exception):
        s3, _ = fsspec_filesystem(uri)
        s3.rm_file(probe)


def list_files(
    uri: str, suffixes: tuple[str, ...] | None = None, recursive: bool = False
) -> list[str]:
    """Sorted URIs of the files under a folder/prefix (case-insensitive suffix filter).

    A folder that does not exist gives an empty list. Hidden files (``.name``) are skipped.
    """
    filesystem, path = resolve_filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    try:
        infos = filesystem.get_file_info(selector)
    except NotADirectoryError:
        return []
    lowered = tuple(suffix.lower() for suffix in suffixes) if suffixes else None
    found = []
    for info in infos:
        if info.type != pafs.FileType.File or info.base_name.startswith("."):
            continue
        if lowered and not info.base_name.lower().endswith(lowered):
            continue
        found.append(_to_uri(str(uri), info.path))
    return sorted(found)


def exists(uri: str) -> bool:
    filesystem, path = resolve_filesystem(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def make_dirs(uri: str) -> None:
    """Create a local folder and its parents; S3 has no folders, so a no-op there."""
    if not is_s3(uri):
        os.makedirs(local_path(str(uri)), exist_ok=True)


def is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    filesystem, path = resolve_filesystem(uri)
    return filesystem.get_file_info(path).type == pafs.FileType.File
