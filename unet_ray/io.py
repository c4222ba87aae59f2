"""Reading and writing images, masks and the DSB2018 layout, on local paths or s3:// URIs. No Ray.

Every filesystem call goes through ``resolve_filesystem``, which gives a pyarrow filesystem and a
path for a URI. A custom S3 endpoint (MinIO, Ceph, a test server) is read from
``AWS_ENDPOINT_URL`` and passed explicitly, because pyarrow does not read that variable itself.

Image decoding (``decode_image``) always returns RGB uint8 (H, W, 3):

- grayscale is repeated into three channels; an alpha channel is dropped; palette images are
  expanded to their colours;
- 16-bit, 32-bit and floating-point images are **percentile-normalised** per image: the
  ``NORMALISE_LOW_PERCENTILE`` (1st) to ``NORMALISE_HIGH_PERCENTILE`` (99.8th) percentile of all
  pixel values map to 0..255, rounded, and values beyond are clipped, so a few hot pixels do not
  darken the whole image as min-max scaling would. The percentiles are taken jointly over the
  colour channels, so one transform serves all three and colour balance is kept (a stretch per
  channel would tint an H&E scan). On big images they are estimated from a regular grid of about
  ``PERCENTILE_SAMPLE_PIXELS`` pixels. Should the two percentiles coincide (more than 98.8 % of
  the pixels alike, e.g. a few bright nuclei on a zero background), min-max is used instead; a
  constant image becomes all zeros. NaN becomes 0 and +inf 255. 8-bit images are never
  rescaled. Training (``prepare``), ``evaluate`` and ``segment`` all decode through here, so they
  see the same normalisation;
- multi-page TIFF: the first page only (for a pyramid, the full-resolution level).

``decode_image_with_original`` also returns the image in its own units (alpha dropped, not
rescaled), for measurements such as the per-nucleus mean intensities of ``unet-ray segment``.

Local files are written whole (``write_bytes_atomic``: temp file + rename) with the permissions the
process's umask gives (0644 under umask 022), like any file the user's tools create.

DSB2018 layout (``list_dsb_samples`` / ``read_dsb_sample``): ``<id>/images/<id>.png`` and one
binary PNG per nucleus in ``<id>/masks/``. Masks combine into int32 instance labels numbered
1..N in sorted mask-file order; where masks overlap the later mask wins. A sample without any mask
file is an error (a lost ``masks/`` folder must not silently become an all-background training
image); pass ``allow_missing_masks=True`` to read such a sample with all-zero labels.
"""

from __future__ import annotations

import io as bytes_io
import os
import re
import secrets
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow.fs as pafs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DEFAULT_S3_REGION = "us-east-1"
S3_READ_THREADS = 16  # parallel GETs when one sample has many mask objects
UINT8_MAX = 255
NORMALISE_LOW_PERCENTILE = 1.0  # of a >8-bit image's values: becomes 0
NORMALISE_HIGH_PERCENTILE = 99.8  # becomes 255; brighter values (hot pixels) are clipped
PERCENTILE_SAMPLE_PIXELS = 1 << 22  # percentiles of bigger images come from a grid this size
NORMALISE_CHUNK_VALUES = 1 << 22  # values converted at a time (bounds the float32 scratch)
NEW_FILE_MODE = 0o666  # the kernel applies the umask: 0644 under umask 022, 0640 under 027
TEMP_NAME_ATTEMPTS = 16  # random temp names tried before giving up
WRITE_PROBE_NAME = ".unet_ray_write_probe"  # hidden, so never listed as an input
RGB_CHANNELS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
PNG_COMPRESS_LEVEL = 3  # zlib level: 4x faster than the default 6 on masks, files a little larger
PNG_END_CHUNK = b"IEND"  # a PNG cut short has lost its end chunk
PNG_BIT_DEPTH_OFFSET = 24  # IHDR: bit depth byte, then colour type byte
PNG_COLOUR_TYPES_WITH_COLOUR_OR_ALPHA = (2, 4, 6)  # RGB, gray+alpha, RGBA
ZIP_READ_GAP = 1 << 20  # entries closer than this (bytes) are fetched in one read
ZIP_LOCAL_HEADER_SIZE = 30
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
ZIP_ENCRYPTED_FLAG = 0x1
ZIP_INDEX_CACHE_SIZE = 4  # zip archives whose sample index is kept in memory
DSB_TRAIN_FOLDER = "stage1_train"
SAMPLE_IMAGE_PATTERN = re.compile(
    r"^(?P<prefix>(?:.*/)?)(?P<id>[^/]+)/images/(?P=id)(?P<suffix>\.[A-Za-z]+)$"
)


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file and the problem."""


class DatasetError(ValueError):
    """A dataset or sample is malformed; the message names the sample/dataset and the problem."""


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
    return pafs.LocalFileSystem(), _local_path(uri)


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
    return fsspec.filesystem("file"), _local_path(uri)


def _local_path(uri: str) -> str:
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
    path = _local_path(uri)
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
    path = _local_path(uri)
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
        os.makedirs(_local_path(str(uri)), exist_ok=True)


# --------------------------------------------------------------------------------------------
# Image decoding and encoding
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode PNG/JPEG/TIFF (incl. BigTIFF, 16-bit) bytes into RGB uint8 (H, W, 3)."""
    return decode_image_with_original(data, name)[0]


def decode_image_with_original(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (H, W, 3) as ``decode_image`` gives, and the image in its own units.

    The original is (H, W) or (H, W, 3) in the file's dtype (uint16 stays uint16, float stays
    float), alpha dropped, never rescaled. For an 8-bit (or 1-bit) file it is the RGB image
    itself, so keeping it costs nothing; for others it is the decoded array (copied only to drop
    an alpha channel, whose memory is then freed).
    """
    original = _drop_alpha(_to_channels_last(_decode_native(data, name), name))
    rgb = _to_rgb_uint8(original, name)
    if original.dtype in (np.uint8, bool):
        return rgb, rgb
    return rgb, np.ascontiguousarray(original)


def read_image(uri: str) -> np.ndarray:
    return decode_image(read_bytes(uri), str(uri))


def read_image_with_original(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """``decode_image_with_original`` of one file: (RGB uint8, the image in its own units)."""
    return decode_image_with_original(read_bytes(uri), str(uri))


def decode_mask(data: bytes, name: str) -> np.ndarray:
    """Decode a mask image into a boolean (H, W) array: any non-zero colour channel is True."""
    array = _drop_alpha(_to_channels_last(_decode_native(data, name), name))
    if array.ndim == RGB_CHANNELS:
        return np.any(array != 0, axis=2)
    return array != 0


def encode_png(array: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a uint16 (H, W) array."""
    from PIL import Image

    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * UINT8_MAX
    if array.dtype not in (np.uint8, np.uint16) or (array.dtype == np.uint16 and array.ndim != 2):
        raise ValueError(f"encode_png: cannot write dtype {array.dtype} with shape {array.shape}")
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        raise ValueError(f"encode_png: expected 3 or 4 channels, got shape {array.shape}")
    buffer = bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def _detect_format(data: bytes) -> str | None:
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    if data.startswith(TIFF_SIGNATURES):
        return "TIFF"
    return None


def _decode_native(data: bytes, name: str) -> np.ndarray:
    """Decode to a numpy array in the file's own dtype (gray, RGB, RGBA or TIFF samples)."""
    if len(data) == 0:
        raise ImageReadError(f"{name}: zero-byte file")
    image_format = _detect_format(data)
    if image_format == "TIFF":
        return _decode_tiff(data, name)
    if image_format == "PNG" and PNG_END_CHUNK not in data:
        raise ImageReadError(f"{name}: truncated or corrupt PNG (no IEND end chunk)")
    if image_format == "PNG" and _is_16_bit_colour_png(data):
        return _decode_16_bit_colour_png(data, name)
    if image_format is None:
        return _decode_other(data, name)
    return _decode_with_pillow(data, name, image_format)


def _is_16_bit_colour_png(data: bytes) -> bool:
    if len(data) <= PNG_BIT_DEPTH_OFFSET + 1:
        return False
    bit_depth, colour_type = data[PNG_BIT_DEPTH_OFFSET], data[PNG_BIT_DEPTH_OFFSET + 1]
    return bit_depth == 16 and colour_type in PNG_COLOUR_TYPES_WITH_COLOUR_OR_ALPHA


def _decode_16_bit_colour_png(data: bytes, name: str) -> np.ndarray:
    # Pillow reduces 16-bit colour PNGs to 8 bits by truncation; OpenCV keeps all 16 bits.
    import cv2

    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageReadError(f"{name}: truncated or corrupt PNG")
    if array.ndim == 3:
        order = [2, 1, 0, 3] if array.shape[2] == 4 else [2, 1, 0][: array.shape[2]]
        array = array[:, :, order] if array.shape[2] in (3, 4) else array
    return array


def _decode_with_pillow(data: bytes, name: str, image_format: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(bytes_io.BytesIO(data)) as image:
            image.load()
            return _pillow_to_array(image)
    except UnidentifiedImageError as error:
        raise ImageReadError(
            f"{name}: truncated or corrupt {image_format} (header unreadable)"
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            f"{name}: {image_format} too large to decode safely ({error}); save it as (Big)TIFF"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"{name}: truncated or corrupt {image_format} ({error})") from error


def _decode_other(data: bytes, name: str) -> np.ndarray:
    """Formats without a signature we know: let Pillow try (BMP, GIF, WebP, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(bytes_io.BytesIO(data)) as image:
            image.load()
            return _pillow_to_array(image)
    except UnidentifiedImageError as error:
        raise ImageReadError(
            f"{name}: not an image (unrecognised format; starts with {data[:16]!r})"
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"{name}: truncated or corrupt image ({error})") from error


def _pillow_to_array(image) -> np.ndarray:
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    return np.asarray(image)


def _decode_tiff(data: bytes, name: str) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(bytes_io.BytesIO(data)) as tiff:
            if not tiff.pages:
                raise ImageReadError(f"{name}: truncated or corrupt TIFF (no readable page)")
            page = tiff.pages.first
            array = page.asarray()
            axes = page.axes
    except ImageReadError:
        raise
    except Exception as error:  # tifffile raises many types for broken files
        raise ImageReadError(f"{name}: truncated or corrupt TIFF ({error})") from error
    if axes.startswith("S") and array.ndim == RGB_CHANNELS:  # planar: samples first
        array = np.moveaxis(array, 0, -1)
    return array


def _to_channels_last(array: np.ndarray, name: str) -> np.ndarray:
    """Squeeze singleton axes beyond (H, W, C); return (H, W) or (H, W, C) with C in 1..4.

    Only extra leading axes are squeezed, so a 1x1 or 1xW RGB image keeps its height axis.
    """
    array = np.asarray(array)
    while array.ndim > 3 and 1 in array.shape[:-2]:
        leading = array.shape[:-2]
        drop = leading.index(1)
        array = array.reshape(leading[:drop] + leading[drop + 1 :] + array.shape[-2:])
    if array.ndim == 3 and array.shape[2] > 4 and array.shape[0] <= 4:
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if (
        array.ndim not in (2, 3)
        or (array.ndim == 3 and array.shape[2] > 4)
        or min(array.shape[:2]) == 0
    ):
        raise ImageReadError(
            f"{name}: unsupported image shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4)"
        )
    return array


def _drop_alpha(array: np.ndarray) -> np.ndarray:
    """(H, W, 2) gray+alpha -> (H, W); (H, W, 4) RGBA -> (H, W, 3)."""
    if array.ndim == 3 and array.shape[2] == 2:
        return array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        return array[:, :, :RGB_CHANNELS]
    return array


def _to_rgb_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W) or (H, W, 3) of any supported dtype -> RGB uint8 (H, W, 3)."""
    array = _rescale_to_uint8(array, name)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], RGB_CHANNELS, axis=2)
    return np.ascontiguousarray(array)


def _rescale_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 unchanged; bool -> 0/255; other dtypes percentile-normalised (module docstring)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * UINT8_MAX
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ImageReadError(f"{name}: unsupported pixel type {array.dtype}")
    low, high = normalisation_range(array)
    return scale_to_uint8(array, low, high)


def scale_to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low``..``high`` mapped to 0..255, rounded, values beyond clipped, NaN to 0 and +inf to
    255; all zeros when ``high <= low``. One float32 row band at a time."""
    scaled = np.zeros(array.shape, dtype=np.uint8)
    if high <= low:  # constant (or no finite value): all zeros
        return scaled
    scale = UINT8_MAX / (high - low)
    is_float = np.issubdtype(array.dtype, np.floating)
    rows = max(1, NORMALISE_CHUNK_VALUES // max(1, array[0].size))
    for start in range(0, array.shape[0], rows):  # a float32 scratch of one row band at a time
        band = array[start : start + rows].astype(np.float32)
        if is_float:
            np.nan_to_num(band, copy=False, nan=low, posinf=high, neginf=low)
        band -= low
        band *= scale
        np.clip(np.rint(band, out=band), 0, UINT8_MAX, out=band)
        scaled[start : start + rows] = band
    return scaled


def normalisation_range(array: np.ndarray) -> tuple[float, float]:
    """(low, high): the values percentile normalisation maps to 0 and 255 (module docstring).

    Joint over the channels; NaN and infinities are ignored; ``high <= low`` only for a constant
    image (or one without any finite value).
    """
    pixels = array.shape[0] * array.shape[1]
    step = max(1, int(np.ceil(np.sqrt(pixels / PERCENTILE_SAMPLE_PIXELS))))
    sample = _finite_values(array[::step, ::step])
    if sample.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(sample, (NORMALISE_LOW_PERCENTILE, NORMALISE_HIGH_PERCENTILE))
    if high <= low:  # most pixels alike (a sparse image): stretch min..max of the whole image
        values = _finite_values(array)
        low, high = values.min(), values.max()
    return float(low), float(high)


def _finite_values(array: np.ndarray) -> np.ndarray:
    """The values of an array, flattened; for floats only the finite ones."""
    if np.issubdtype(array.dtype, np.floating):
        return array[np.isfinite(array)]
    return array.reshape(-1)


# --------------------------------------------------------------------------------------------
# The DSB2018 layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRef:
    source: str  # the folder holding <id>/ folders, or the .zip archive
    sample_id: str


def _is_zip(uri: str) -> bool:
    return str(uri).lower().endswith(".zip")


def _choose_sample_prefix(candidates: dict[str, list[str]], source: str) -> str:
    """Pick the folder holding the samples: the top level, the only one, or stage1_train/."""
    if "" in candidates or not candidates:
        return ""
    if len(candidates) == 1:
        return next(iter(candidates))
    train = [
        prefix for prefix in candidates if prefix.rstrip("/").split("/")[-1] == DSB_TRAIN_FOLDER
    ]
    if len(train) == 1:
        return train[0]
    raise DatasetError(
        f"{source}: DSB2018 samples in several folders {sorted(candidates)}; "
        "point the source at one of them"
    )


def _group_samples(relative_paths: list[str]) -> dict[str, dict[str, str]]:
    """{prefix: {sample_id: image relative path}} for paths like <prefix><id>/images/<id>.png."""
    groups: dict[str, dict[str, str]] = {}
    for relative_path in relative_paths:
        match = SAMPLE_IMAGE_PATTERN.match(relative_path)
        if match and match.group("suffix").lower() in IMAGE_SUFFIXES:
            groups.setdefault(match.group("prefix"), {})[match.group("id")] = relative_path
    return groups


def _empty_dataset_error(source: str) -> DatasetError:
    return DatasetError(f"no DSB2018 samples under {source}: expected <id>/images/<id>.png")


def list_dsb_samples(source: str) -> list[SampleRef]:
    """Samples of a DSB2018-layout dataset: a folder (or its stage1_train/), a .zip, or s3://."""
    source = str(source)
    if _is_zip(source):
        index = _zip_index(source)
        return [SampleRef(source, sample_id) for sample_id in sorted(index)]
    if not is_s3(source) and not os.path.isdir(_local_path(source)):
        raise DatasetError(f"{source}: no such folder or .zip file")
    base = source.rstrip("/") if is_s3(source) else _local_path(source)
    files = list_files(base, recursive=True)
    relative_paths = [uri[len(base) :].lstrip("/").replace(os.sep, "/") for uri in files]
    groups = _group_samples(relative_paths)
    if not groups:
        raise _empty_dataset_error(source)
    prefix = _choose_sample_prefix({key: list(value) for key, value in groups.items()}, source)
    root = join_uri(base, prefix.rstrip("/")) if prefix else base
    return [SampleRef(root, sample_id) for sample_id in sorted(groups[prefix])]


def read_dsb_sample(
    ref: SampleRef, allow_missing_masks: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Image RGB uint8 (H, W, 3) and int32 instance labels (H, W) of one DSB2018 sample."""
    if _is_zip(ref.source):
        return _read_zip_sample(ref, allow_missing_masks)
    sample_uri = join_uri(ref.source, ref.sample_id)
    files = list_files(sample_uri, recursive=True)
    relative = {uri[len(sample_uri) :].lstrip("/").replace(os.sep, "/"): uri for uri in files}
    image_names = _image_names(relative)
    mask_names = _mask_names(relative)
    image_name = _pick_sample_image(image_names, ref)
    image = read_image(relative[image_name])
    mask_uris = [relative[mask] for mask in mask_names]
    masks = list(zip(mask_uris, read_many_bytes(mask_uris), strict=True))
    labels = _labels_from_masks(masks, image.shape[:2], ref, allow_missing_masks)
    return image, labels


def write_dsb_sample(
    root_uri: str,
    sample_id: str,
    image: np.ndarray,
    labels: np.ndarray,
    mask_ids: list[str] | None = None,
) -> list[str]:
    """Write one sample in DSB2018 layout: an RGBA image PNG and one 0/255 PNG per label.

    ``mask_ids`` names the masks of labels 1..N in label order (default: ``<sample_id>_<k>`` with
    zero-padded k, so sorted file order equals label order). Returns the mask ids written.
    """
    root_uri = str(root_uri)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(
            f"sample {sample_id}: image must be uint8 (H, W, 3|4), got {image.dtype} {image.shape}"
        )
    if labels.shape != image.shape[:2]:
        raise ValueError(
            f"sample {sample_id}: labels {labels.shape} do not match image {image.shape[:2]}"
        )
    label_values = [int(value) for value in np.unique(labels) if value > 0]
    if mask_ids is None:
        width = max(3, len(str(len(label_values))))
        mask_ids = [f"{sample_id}_{index:0{width}d}" for index in range(1, len(label_values) + 1)]
    if len(mask_ids) != len(label_values):
        raise ValueError(
            f"sample {sample_id}: {len(mask_ids)} mask ids for {len(label_values)} labels"
        )
    if image.shape[2] == RGB_CHANNELS:
        alpha = np.full(image.shape[:2] + (1,), UINT8_MAX, dtype=np.uint8)
        image = np.concatenate([image, alpha], axis=2)
    sample_uri = join_uri(root_uri, sample_id)
    write_bytes_atomic(join_uri(sample_uri, "images", f"{sample_id}.png"), encode_png(image))
    for mask_id, value in zip(mask_ids, label_values, strict=True):
        mask = (labels == value).astype(np.uint8) * UINT8_MAX
        write_bytes_atomic(join_uri(sample_uri, "masks", f"{mask_id}.png"), encode_png(mask))
    return list(mask_ids)


def _image_names(relative_paths) -> list[str]:
    return sorted(
        path
        for path in relative_paths
        if path.startswith("images/")
        and path.count("/") == 1
        and path.lower().endswith(IMAGE_SUFFIXES)
    )


def _mask_names(relative_paths) -> list[str]:
    return sorted(
        path
        for path in relative_paths
        if path.startswith("masks/")
        and path.count("/") == 1
        and path.lower().endswith(IMAGE_SUFFIXES)
    )


def _pick_sample_image(image_names: list[str], ref: SampleRef) -> str:
    if not image_names:
        raise DatasetError(
            f"sample {ref.sample_id} in {ref.source}: no images/ folder "
            f"(expected {ref.sample_id}/images/{ref.sample_id}.png)"
        )
    preferred = [name for name in image_names if Path(name).stem == ref.sample_id]
    if preferred:
        return preferred[0]
    if len(image_names) == 1:
        return image_names[0]
    raise DatasetError(
        f"sample {ref.sample_id} in {ref.source}: several images {image_names} and none named "
        f"{ref.sample_id}.png"
    )


def _labels_from_masks(
    masks: list[tuple[str, bytes]],
    shape: tuple[int, int],
    ref: SampleRef,
    allow_missing_masks: bool,
) -> np.ndarray:
    """Combine binary masks into int32 labels 1..N (sorted order; later masks win overlaps)."""
    if not masks and not allow_missing_masks:
        raise DatasetError(
            f"sample {ref.sample_id} in {ref.source}: no masks/ folder or no mask PNGs in it "
            f"(expected one binary PNG per nucleus in {ref.sample_id}/masks/)"
        )
    labels = np.zeros(shape, dtype=np.int32)
    for label, (mask_name, data) in enumerate(masks, start=1):
        try:
            mask = decode_mask(data, mask_name)
        except ImageReadError as error:
            raise DatasetError(f"sample {ref.sample_id}: {error}") from error
        if mask.shape != tuple(shape):
            raise DatasetError(
                f"sample {ref.sample_id}: mask {mask_name} is {mask.shape[0]}x{mask.shape[1]} (HxW) "
                f"but its image is {shape[0]}x{shape[1]}"
            )
        labels[mask] = label
    return labels


# --------------------------------------------------------------------------------------------
# Zip archives (Kaggle's stage1_train.zip), local or on S3
# --------------------------------------------------------------------------------------------

_zip_index_cache: OrderedDict = OrderedDict()
_zip_index_lock = threading.Lock()


@dataclass(frozen=True)
class _ZipEntry:
    name: str
    header_offset: int  # where the entry's local header starts
    end_offset: int  # where the next entry (or the central directory) starts
    compress_type: int
    compress_size: int
    crc: int
    encrypted: bool


@dataclass(frozen=True)
class _ZipSample:
    image: _ZipEntry
    masks: tuple[_ZipEntry, ...]


@contextmanager
def _open_zip(source: str):
    """The archive as a ZipFile over one random-access pyarrow file (local or S3)."""
    filesystem, path = resolve_filesystem(source)
    try:
        handle = filesystem.open_input_file(path)
    except FileNotFoundError as error:
        raise DatasetError(f"{source}: no such .zip file") from error
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise DatasetError(f"{source}: not a valid .zip archive ({error})") from error
        with archive:
            yield archive


def _zip_index(source: str) -> dict[str, _ZipSample]:
    """{sample_id: entries} for one archive, read once and cached by (source, size, mtime)."""
    filesystem, path = resolve_filesystem(source)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"{source}: no such .zip file")
    key = (source, info.size, info.mtime_ns)
    with _zip_index_lock:
        if key in _zip_index_cache:
            _zip_index_cache.move_to_end(key)
            return _zip_index_cache[key]
    with _open_zip(source) as archive:
        entries = _zip_entries(archive)
    index = _build_zip_index(entries, source)
    with _zip_index_lock:
        _zip_index_cache[key] = index
        while len(_zip_index_cache) > ZIP_INDEX_CACHE_SIZE:
            _zip_index_cache.popitem(last=False)
    return index


def _zip_entries(archive: zipfile.ZipFile) -> dict[str, _ZipEntry]:
    infos = sorted(archive.infolist(), key=lambda info: info.header_offset)
    ends = [info.header_offset for info in infos[1:]] + [archive.start_dir]
    return {
        info.filename: _ZipEntry(
            name=info.filename,
            header_offset=info.header_offset,
            end_offset=end,
            compress_type=info.compress_type,
            compress_size=info.compress_size,
            crc=info.CRC,
            encrypted=bool(info.flag_bits & ZIP_ENCRYPTED_FLAG),
        )
        for info, end in zip(infos, ends, strict=True)
        if not info.filename.endswith("/")
    }


def _build_zip_index(entries: dict[str, _ZipEntry], source: str) -> dict[str, _ZipSample]:
    groups = _group_samples(list(entries))
    if not groups:
        raise _empty_dataset_error(source)
    prefix = _choose_sample_prefix({key: list(value) for key, value in groups.items()}, source)
    masks_by_sample: dict[str, list[str]] = {}
    for name in entries:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) == 3 and parts[1] == "masks" and parts[2].lower().endswith(IMAGE_SUFFIXES):
            masks_by_sample.setdefault(parts[0], []).append(name)
    return {
        sample_id: _ZipSample(
            entries[image_name],
            tuple(entries[name] for name in sorted(masks_by_sample.get(sample_id, []))),
        )
        for sample_id, image_name in groups[prefix].items()
    }


def _read_zip_entries(source: str, entries: list[_ZipEntry]) -> dict[str, bytes]:
    """Contents of some archive entries, reading each run of neighbouring entries in one request
    (a DSB2018 sample's image and masks are stored together: one range GET on S3)."""
    runs: list[list[_ZipEntry]] = []
    for entry in sorted(entries, key=lambda entry: entry.header_offset):
        if runs and entry.header_offset - runs[-1][-1].end_offset <= ZIP_READ_GAP:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    filesystem, path = resolve_filesystem(source)
    contents = {}
    with filesystem.open_input_file(path) as handle:
        for run in runs:
            start, end = run[0].header_offset, max(entry.end_offset for entry in run)
            block = handle.read_at(end - start, start)
            for entry in run:
                contents[entry.name] = _extract_zip_entry(
                    block, entry.header_offset - start, entry, source
                )
    return contents


def _extract_zip_entry(block: bytes, offset: int, entry: _ZipEntry, source: str) -> bytes:
    """Decompress one entry from raw archive bytes (stored or deflated), checking its CRC."""
    where = f"{source}:{entry.name}"
    if entry.encrypted:
        raise DatasetError(f"{where}: encrypted zip entries are not supported")
    header = block[offset : offset + ZIP_LOCAL_HEADER_SIZE]
    if len(header) < ZIP_LOCAL_HEADER_SIZE or not header.startswith(ZIP_LOCAL_HEADER_SIGNATURE):
        raise DatasetError(f"{where}: corrupt zip archive (bad local header)")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    data_start = offset + ZIP_LOCAL_HEADER_SIZE + name_length + extra_length
    raw = block[data_start : data_start + entry.compress_size]
    if len(raw) < entry.compress_size:
        raise DatasetError(f"{where}: corrupt zip archive (entry cut short)")
    if entry.compress_type == zipfile.ZIP_STORED:
        content = raw
    elif entry.compress_type == zipfile.ZIP_DEFLATED:
        try:
            content = zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw)
        except zlib.error as error:
            raise DatasetError(f"{where}: corrupt zip entry ({error})") from error
    else:
        with _open_zip(source) as archive:  # bzip2 / lzma: let zipfile do it
            content = archive.read(entry.name)
    if zlib.crc32(content) != entry.crc:
        raise DatasetError(f"{where}: corrupt zip entry (CRC mismatch)")
    return content


def _read_zip_sample(ref: SampleRef, allow_missing_masks: bool) -> tuple[np.ndarray, np.ndarray]:
    index = _zip_index(ref.source)
    if ref.sample_id not in index:
        raise DatasetError(
            f"sample {ref.sample_id} in {ref.source}: no images/ folder "
            f"(expected {ref.sample_id}/images/{ref.sample_id}.png)"
        )
    sample = index[ref.sample_id]
    contents = _read_zip_entries(ref.source, [sample.image, *sample.masks])
    image = decode_image(contents[sample.image.name], f"{ref.source}:{sample.image.name}")
    masks = [(f"{ref.source}:{mask.name}", contents[mask.name]) for mask in sample.masks]
    labels = _labels_from_masks(masks, image.shape[:2], ref, allow_missing_masks)
    return image, labels
