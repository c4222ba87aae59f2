"""Image decoding and encoding: any input image to RGB uint8, and PNG out. No Ray.

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
"""

from __future__ import annotations

import io as bytes_io
import re

import numpy as np

from unet_ray.io.files import read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


UINT8_MAX = 255
NORMALISE_LOW_PERCENTILE = 1.0  # of a >8-bit image's values: becomes 0
NORMALISE_HIGH_PERCENTILE = 99.8  # becomes 255; brighter values (hot pixels) are clipped
PERCENTILE_SAMPLE_PIXELS = 1 << 22  # percentiles of bigger images come from a grid this size
NORMALISE_CHUNK_VALUES = 1 << 22  # values converted at a time (bounds the float32 scratch)


RGB_CHANNELS = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
PNG_COMPRESS_LEVEL = 3  # zlib level: 4x faster than the default 6 on masks, files a little larger
PNG_END_CHUNK = b"IEND"  # a PNG cut short has lost its end chunk
PNG_BIT_DEPTH_OFFSET = 24  # IHDR: bit depth byte, then colour type byte
PNG_COLOUR_TYPES_WITH_COLOUR_OR_ALPHA = (2, 4, 6)  # RGB, gray+alpha, RGBA


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file and the problem."""


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


def read_image_with_pixel_size(uri: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """``read_image_with_original`` and the microns per pixel the file states (one read)."""
    data = read_bytes(uri)
    rgb, original = decode_image_with_original(data, str(uri))
    return rgb, original, decode_pixel_size(data)


MICRONS_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre
IMAGEJ_MICRON_UNITS = ("micron", "microns", "um", "\u00b5m", "µm")  # ImageJ's unit=...
# microns per pixel a microscope image can have: a resolution outside (72 dpi is 353 um/px) is
# a writer's default, not the image's, and is ignored
PLAUSIBLE_MPP = (0.01, 100.0)
OME_PHYSICAL_SIZE_X = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"')
OME_PHYSICAL_UNIT_X = re.compile(r'PhysicalSizeXUnit="([^"]+)"')


def decode_pixel_size(data: bytes) -> float | None:
    """Microns per pixel a TIFF states on its first page: OME-XML ``PhysicalSizeX`` (in µm),
    ``XResolution`` with ``ResolutionUnit`` inch or centimetre, or ImageJ's resolution with
    ``unit=micron``. None for PNG/JPEG, for a TIFF that states none, or for a value outside
    ``PLAUSIBLE_MPP`` (a writer's 72-dpi default)."""
    if not data.startswith(TIFF_SIGNATURES):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(bytes_io.BytesIO(data)) as tiff:
            mpp = _ome_pixel_size(tiff.ome_metadata) or _tag_pixel_size(tiff)
    except Exception:  # an unreadable TIFF fails where it is decoded, with its own message
        return None
    if mpp is None or not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None
    return mpp


def _ome_pixel_size(ome_xml: str | None) -> float | None:
    if not ome_xml:
        return None
    size = OME_PHYSICAL_SIZE_X.search(ome_xml)
    unit = OME_PHYSICAL_UNIT_X.search(ome_xml)
    if size is None or (unit is not None and unit.group(1) not in ("µm", "um", "micron")):
        return None
    return float(size.group(1))


def _tag_pixel_size(tiff) -> float | None:
    tags = tiff.pages.first.tags
    resolution, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if resolution is None:
        return None
    numerator, denominator = resolution.value
    if not numerator or not denominator:
        return None
    unit_code = int(unit.value) if unit is not None else 2  # TIFF's default unit is the inch
    microns = MICRONS_PER_UNIT.get(unit_code)
    imagej = tiff.imagej_metadata or {}
    if microns is None and str(imagej.get("unit", "")).lower() in IMAGEJ_MICRON_UNITS:
        microns = 1.0  # ImageJ: pixels per micron, unit NONE
    return None if microns is None else microns * denominator / numerator


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
