"""CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine, which Python does not expose).

The scan of a torch zip checkpoint needs the CRC of every entry (to catch damage) and the CRC of the whole
file (the archive's entry header): combining the first gives the second without a second pass over the data.
"""

from __future__ import annotations

_POLY = 0xEDB88320  # reflected CRC-32 polynomial, as zlib


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo p(x), bit-reflected as zlib keeps them."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    p = 1 << 30  # x^1
    table = [p]
    for _ in range(31):
        p = _multmodp(p, p)
        table.append(p)
    return table


_X2N = _x2n_table()  # x^(2^n) modulo p(x)


def _x8nmodp(length: int) -> int:
    """x^(8 * length) modulo p(x): the shift that appending `length` bytes applies to a CRC."""
    p, k = 1 << 31, 3
    while length:
        if length & 1:
            p = _multmodp(_X2N[k & 31], p)
        length >>= 1
        k += 1
    return p


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B, given crc1 = crc32(A), crc2 = crc32(B) and len2 = len(B)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2
