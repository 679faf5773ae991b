"""Image files read whole before anything uses them: a gzip stream to its end, a NIfTI file against its header's
size, other formats by their nnU-Net reader. SimpleITK reads a truncated ``.nii.gz`` and fills what is missing with
zeros; these functions say what is wrong with the file instead (``input_checks``, ``trainers.common.data_checks``)."""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional


CHUNK = 1 << 22  # bytes decompressed at a time
HEADER_BYTES = 540  # a NIfTI-2 header (NIfTI-1: 348)
RECOPY = "copy it again from its source"


@dataclass
class ImageInfo:
    """What the reader says of a file: axes, voxels per axis (x first, as SimpleITK), spacing, values per voxel,
    and how many of the model's channels nnU-Net takes from it (the volumes of a 4D file, else 1)."""
    dimension: int
    size: tuple
    spacing: tuple
    components: int = 1
    channels: int = 1



def _read_gzip(path: str):
    """(problem or None, the first HEADER_BYTES decompressed bytes, the decompressed length)."""
    head, total = b"", 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                if len(head) < HEADER_BYTES:
                    head += chunk[:HEADER_BYTES - len(head)]
                total += len(chunk)
    except EOFError:
        return "is truncated (its gzip stream ends early: a copy cut short)", head, total
    except gzip.BadGzipFile as error:
        if "Not a gzipped file" in str(error):
            return "not gzip", head, total
        return f"is corrupted (gzip: {error})", head, total
    except zlib.error as error:
        return f"is corrupted (its compressed data is invalid: {error})", head, total
    except OSError as error:
        return f"cannot be read ({error.strerror or error})", head, total
    return None, head, total


def nifti_size(header: bytes) -> Optional[int]:
    """The bytes a single-file NIfTI-1/2 image must hold (header, extensions and voxels) by its header, or None
    if ``header`` is not the start of one."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:348] != b"n+1\x00":
                return None
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = struct.unpack(endian + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if not header[4:12].startswith(b"n+2"):
                return None
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        if not 1 <= dim[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dim[1:dim[0] + 1]) or offset < 348:
            return None
        voxels = 1
        for d in dim[1:dim[0] + 1]:
            voxels *= max(int(d), 1)
        return int(offset) + voxels * int(bitpix) // 8
    return None


def _itk_error(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text.replace("sitk::ERROR: ", "")[:200]


def whole_file_problem(path: str) -> Optional[str]:
    """Why ``path`` is not whole (e.g. "is truncated (...)"), or None: a gzip stream read to its end (length and
    CRC), a NIfTI image against the size its header announces. Cheap next to the reading nnU-Net does anyway, and
    needs no image library (the raw training images at trainer start are checked with it)."""
    return _whole(path)[0]


def _whole(path: str):
    """(problem or None, the first bytes of the image data stream, the length of that stream)."""
    problem = "not gzip"
    if path.endswith(".gz"):
        problem, head, length = _read_gzip(path)
    if problem == "not gzip":  # not compressed (an uncompressed file named .gz is readable if it is whole)
        try:
            problem, head, length = None, _head(path), os.path.getsize(path)
        except OSError as error:
            return f"cannot be read ({error.strerror or error})", b"", 0
    if problem:
        return problem, head, length
    expected = nifti_size(head)
    if expected is not None and length < expected:
        return f"is truncated (its header announces {expected} bytes of image, it holds {length})", head, length
    return None, head, length


def read_image(path: str, reader_class=None):
    """(ImageInfo, None) for a file read whole, or (None, what is wrong and the fix). ``reader_class``: the
    model's nnU-Net reader; SimpleITK's (nnU-Net's default) is read by header after the whole-file checks, any
    other by a full read with it."""
    name = os.path.basename(path)
    problem = whole_file_problem(path)
    if problem:
        return None, f"{name} {problem}: {RECOPY}"
    if reader_class is not None and not _is_simpleitk(reader_class):
        return _read_with(path, reader_class)
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        if not path.endswith((".gz", ".nii")):  # other formats: let the reader check the voxels too
            sitk.ReadImage(path)
    except RuntimeError as error:
        return None, f"{name} cannot be read as an image ({_itk_error(error)}): {RECOPY}, or convert it"
    size = tuple(int(s) for s in reader.GetSize())
    dimension = reader.GetDimension()
    return ImageInfo(dimension, size, tuple(reader.GetSpacing()), reader.GetNumberOfComponents(),
                     size[3] if dimension == 4 else 1), None


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(HEADER_BYTES)
    except OSError:
        return b""


def _is_simpleitk(reader_class) -> bool:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    return isinstance(reader_class, type) and issubclass(reader_class, SimpleITKIO)


def _read_with(path: str, reader_class):
    """A file of a reader other than SimpleITK's (NIfTI by nibabel, PNG, TIFF), read whole by it."""
    try:
        data, properties = reader_class().read_images([path])
    except Exception as error:  # each reader fails in its own way
        return None, (f"{os.path.basename(path)} cannot be read by {reader_class.__name__} "
                      f"({type(error).__name__}: {str(error)[:200]}): {RECOPY}, or convert it")
    shape = tuple(int(s) for s in data.shape[1:])[::-1]  # x first, as SimpleITK
    dimension = 2 if shape[-1] == 1 else 3
    return ImageInfo(dimension, shape[:dimension], tuple(properties.get("spacing", ()))[::-1][:dimension], 1,
                     int(data.shape[0])), None
