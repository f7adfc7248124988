""".npz request and answer bodies without zipfile.

np.load and np.savez cost 150 and 45 us per small request (zipfile objects, a Python-literal parser for the
.npy header): most of the handler's time on a small model. The common case, stored (not compressed) entries
of plain numeric arrays, is read and written here directly; anything else goes to numpy.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np

from .errors import BadRequest

MAX_NPZ_ENTRIES = 256  # arrays in one request body: one per input, so more is a malformed (or hostile) body
_LOCAL = struct.Struct("<4s5H3L2H")  # zip local file header
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # zip central directory entry
_END = struct.Struct("<4s4H2LH")  # end of central directory
_NPY_DICT = re.compile(
    r"\{'descr': *'([<>|=]?[biuf]\d{1,2})', *'fortran_order': *(True|False), *'shape': *\(((?:\d+, *)*(?:\d+,?)?)\),? *\} *\n?"
)


MAX_DECODED = 256 << 20  # bytes one request's arrays may decompress to: compressed bodies can be bombs


def read_npz(body: bytes) -> dict[str, np.ndarray]:
    arrays = _read_stored_npz(body)
    if arrays is None:
        _check_sizes(body)
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    return arrays


def _check_sizes(body: bytes) -> None:
    """Before numpy allocates anything: every entry's declared array fits in what the entry holds, and all of
    them together in MAX_DECODED (a header may declare 2**40 elements; a deflated entry may be a zip bomb)."""
    import zipfile

    total = 0
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        infos = z.infolist()
        if len(infos) > MAX_NPZ_ENTRIES:
            raise BadRequest(f"body is not a readable .npz ({len(infos)} entries; a request has one per input)")
        for info in infos:
            total += info.file_size
            if total > MAX_DECODED:
                raise BadRequest(f"the .npz decompresses to more than {MAX_DECODED >> 20} MiB", 413)
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f, max_header_size=10000)
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise BadRequest(
                        f"body is not a readable .npz (entry {info.filename} declares {declared} bytes, holds {info.file_size})"
                    )


def _read_stored_npz(body: bytes) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz whose entries are all stored .npy files of numbers; None for anything else."""
    end = body.rfind(b"PK\x05\x06", max(0, len(body) - 22 - 65535))
    if end < 0 or end + _END.size > len(body):
        return None
    _, disk, _, count, total, _, pos, _ = _END.unpack_from(body, end)
    if disk or count != total or pos == 0xFFFFFFFF:
        return None  # multi-disk or zip64: numpy's reader
    if count > MAX_NPZ_ENTRIES:
        raise BadRequest(f"body is not a readable .npz ({count} entries; a request has one per input)")
    arrays, spans, used = {}, [], 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(body):
            return None
        sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _, offset = _CENTRAL.unpack_from(body, pos)
        name = body[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + elen + clen
        if sig != b"PK\x01\x02" or method != 0 or flags & 1 or csize != usize or not name.endswith(b".npy"):
            return None
        if offset + _LOCAL.size > len(body) or body[offset : offset + 4] != b"PK\x03\x04":
            return None
        start = offset + _LOCAL.size + sum(_LOCAL.unpack_from(body, offset)[-2:])
        data = memoryview(body)[start : start + csize]
        if len(data) != csize:
            return None
        spans.append((start, start + csize))
        used += csize
        if used > len(body):  # entries sharing bytes, to be checked and read again and again
            raise BadRequest("body is not a readable .npz (entries overlap)")
        if zlib.crc32(data) != crc:
            raise BadRequest(f"body is not a readable .npz (entry {name.decode(errors='replace')} fails its CRC check)")
        arr = _read_npy(body, start, csize)
        if arr is None:
            return None
        arrays[name[:-4].decode("utf-8" if flags & 0x800 else "cp437", errors="replace")] = arr
    spans.sort()
    if any(b > a for (_, b), (a, _) in zip(spans, spans[1:])):
        raise BadRequest("body is not a readable .npz (entries overlap)")
    return arrays


def _read_npy(body: bytes, start: int, size: int) -> np.ndarray | None:
    if body[start : start + 6] != b"\x93NUMPY" or body[start + 6] not in (1, 2, 3):
        return None
    if body[start + 6] == 1:
        hlen, hstart = int.from_bytes(body[start + 8 : start + 10], "little"), start + 10
    else:
        hlen, hstart = int.from_bytes(body[start + 8 : start + 12], "little"), start + 12
    m = _NPY_DICT.fullmatch(body[hstart : hstart + hlen].decode("latin1").rstrip(" "))
    if m is None:
        return None
    dtype = np.dtype(m.group(1))
    shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if hstart + hlen + count * dtype.itemsize != start + size:
        return None  # truncated or padded: let numpy say what is wrong
    arr = np.frombuffer(body, dtype, count, offset=hstart + hlen)
    return arr.reshape(shape, order="F" if m.group(2) == "True" else "C")


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez writes (stored entries of .npy v1.0 files), built directly."""
    if sum(a.nbytes for a in arrays.values()) > 1 << 30:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    out, central = bytearray(), bytearray()
    for name, arr in arrays.items():
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        shape = f"({arr.shape[0]},)" if arr.ndim == 1 else "(" + ", ".join(map(str, arr.shape)) + ")"
        text = f"{{'descr': '{arr.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
        text += " " * (63 - (10 + len(text)) % 64) + "\n"  # numpy pads the header to a multiple of 64
        payload = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1") + arr.tobytes()
        fname = f"{name}.npy".encode()
        flag = 0 if fname.isascii() else 0x800  # UTF-8 names say so, as zipfile does
        crc = zlib.crc32(payload)
        size = len(payload)
        central += _CENTRAL.pack(b"PK\x01\x02", 20, 20, flag, 0, 0, 0x21, crc, size, size, len(fname), 0, 0, 0, 0, 0, len(out)) + fname
        out += _LOCAL.pack(b"PK\x03\x04", 20, 0, flag, 0, 0x21, crc, size, size, len(fname), 0) + fname + payload
    count = len(arrays)
    return bytes(out + central + _END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), len(out), 0))
