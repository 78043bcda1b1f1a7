"""``.npy`` bodies for the inference API, read without ``numpy.load``.

numpy parses an ``.npy`` header with ``ast.literal_eval``, which CPython 3.11 before 3.11.8 can fail with
``SystemError: AST constructor recursion depth mismatch`` when threads call it at once (gh-106905): the API reads
bodies on many threads. The header of a plain array is small and regular (``{'descr': '<f4', 'fortran_order':
False, 'shape': (1, 3, 224, 224), }``), so it is read here by a strict pattern: numeric dtypes only, no object
arrays, the data length checked against the shape before a byte is interpreted.
"""

from __future__ import annotations

import math
import re
import struct

import numpy as np

MAGIC = b"\x93NUMPY"
_HEADER = re.compile(r"^\{\s*'descr'\s*:\s*'([<>|=]?[a-zA-Z]\d{0,2})'\s*,\s*'fortran_order'\s*:\s*(True|False)\s*,"
                     r"\s*'shape'\s*:\s*\(\s*((?:\d+\s*,\s*)*\d*)\s*\)\s*,?\s*\}\s*$")
_KINDS = set("fiub")  # float, signed and unsigned integer, bool


def read_npy(data: bytes) -> np.ndarray:
    """The array an ``.npy`` file holds, or ValueError saying why it is not one this reader takes."""
    if not data.startswith(MAGIC) or len(data) < 10:
        raise ValueError("not a .npy array (no \\x93NUMPY magic)")
    major = data[6]
    if major == 1:
        (size,), start = struct.unpack("<H", data[8:10]), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise ValueError("a truncated .npy header")
        (size,), start = struct.unpack("<I", data[8:12]), 12
    else:
        raise ValueError(f".npy format version {major} unknown")
    if size > 65536 or start + size > len(data):
        raise ValueError("a .npy header longer than the body")
    header = data[start:start + size].decode("latin-1")
    m = _HEADER.match(header)
    if m is None:
        raise ValueError("a .npy header this reader does not take (a plain numeric array is expected)")
    descr, fortran, dims = m.group(1), m.group(2) == "True", m.group(3)
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise ValueError(f".npy dtype {descr!r} unknown") from None
    if dtype.kind not in _KINDS:
        raise ValueError(f".npy dtype {descr!r}: only numbers and booleans are taken")
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    count = math.prod(shape)
    body = memoryview(data)[start + size:]
    if len(body) != count * dtype.itemsize:
        raise ValueError(f".npy shape {list(shape)} of {dtype} needs {count * dtype.itemsize} bytes, the body has "
                         f"{len(body)}")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")


def npy_parts(array: np.ndarray) -> tuple[bytes, memoryview]:
    """An array as ``.npy``: the header, and the array's own bytes (no copy of a C-contiguous array), to send
    one after the other."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    if array.dtype.kind not in _KINDS:
        raise ValueError(f"dtype {array.dtype}: only numbers and booleans travel as .npy here")
    shape = repr(tuple(int(d) for d in array.shape))  # (1, 3, 224, 224), (5,), ()
    text = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = -(len(MAGIC) + 4 + len(text) + 1) % 64  # numpy aligns the data to 64 bytes
    header = text + " " * pad + "\n"
    return MAGIC + b"\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1"), \
        memoryview(array.reshape(-1).view(np.uint8))


def write_npy(array: np.ndarray) -> bytes:
    head, data = npy_parts(array)
    return head + data.tobytes()
