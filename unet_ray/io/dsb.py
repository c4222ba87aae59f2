"""The DSB2018 layout, in a folder, a .zip archive (Kaggle's stage1_train.zip) or under s3://.

``list_dsb_samples`` / ``read_dsb_sample``: ``<id>/images/<id>.png`` and one
binary PNG per nucleus in ``<id>/masks/``. Masks combine into int32 instance labels numbered
1..N in sorted mask-file order; where masks overlap the later mask wins. A sample without any mask
file is an error (a lost ``masks/`` folder must not silently become an all-background training
image); pass ``allow_missing_masks=True`` to read such a sample with all-zero labels.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zipfile
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from unet_ray.io.files import (
    is_s3,
    join_uri,
    list_files,
    local_path,
    read_many_bytes,
    resolve_filesystem,
    write_bytes_atomic,
)
from unet_ray.io.images import (
    IMAGE_SUFFIXES,
    RGB_CHANNELS,
    UINT8_MAX,
    ImageReadError,
    decode_image,
    decode_mask,
    encode_png,
    read_image,
)

ZIP_READ_GAP = 1 << 20  # entries closer than this (bytes) are fetched in one read
ZIP_LOCAL_HEADER_SIZE = 30
ZIP_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
ZIP_ENCRYPTED_FLAG = 0x1
ZIP_INDEX_CACHE_SIZE = 4  # zip archives whose sample index is kept in memory
DSB_TRAIN_FOLDER = "stage1_train"
SAMPLE_IMAGE_PATTERN = re.compile(
    r"^(?P<prefix>(?:.*/)?)(?P<id>[^/]+)/images/(?P=id)(?P<suffix>\.[A-Za-z]+)$"
)


class DatasetError(ValueError):
    """A dataset or sample is malformed; the message names the sample/dataset and the problem."""


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
    if not is_s3(source) and not os.path.isdir(local_path(source)):
        raise DatasetError(f"{source}: no such folder or .zip file")
    base, prefix, images = _folder_samples(source)
    root = join_uri(base, prefix.rstrip("/")) if prefix else base
    return [SampleRef(root, sample_id) for sample_id in sorted(images)]


def list_dsb_images(source: str) -> list[str]:
    """The image URIs (``<id>/images/<id>.png``, sorted by id) of the samples of a DSB2018-layout
    folder or s3:// prefix, chosen as ``list_dsb_samples`` chooses them; their masks are not
    listed. Raises ``DatasetError`` where there are none."""
    base, prefix, images = _folder_samples(str(source))
    return [join_uri(base, images[sample_id]) for sample_id in sorted(images)]


def _folder_samples(source: str) -> tuple[str, str, dict[str, str]]:
    """The base of a DSB2018-layout folder/prefix, the prefix below it holding the samples and
    {sample_id: image path relative to the base}."""
    base = source.rstrip("/") if is_s3(source) else local_path(source)
    files = list_files(base, recursive=True)
    relative_paths = [uri[len(base) :].lstrip("/").replace(os.sep, "/") for uri in files]
    groups = _group_samples(relative_paths)
    if not groups:
        raise _empty_dataset_error(source)
    prefix = _choose_sample_prefix({key: list(value) for key, value in groups.items()}, source)
    return base, prefix, groups[prefix]


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
