"""R's lazy-load databases (data/Rdata.rdx + Rdata.rdb), as a binary R package installs its
data: the janeaustenr novels of the built-in corpus `austen`. Each object is decoded with the
rdata package; this module only finds and decompresses it."""
import bz2
import lzma
import struct
import warnings
import zlib
from pathlib import Path

__all__ = ["read_lazyload_db"]


def read_lazyload_db(data_dir: Path) -> dict:
    """{name: R object converted to Python} from an R lazy-load database (Rdata.rdx/.rdb).

    The .rdx index is an RDS file: list(variables = list(name = c(offset, length)), ...,
    compressed = TRUE | 2 | 3). Each .rdb entry at that offset is a 4-byte big-endian length of
    the serialized object, then (compression 2 or 3 only) a type byte, then the compressed
    serialization ('Z' zlib, '2' bzip2, 'X' xz, '0' none; plain zlib when compressed is TRUE).
    """
    import rdata
    with warnings.catch_warnings():
        # rdata warns that ".rdx" is an unusual extension and that raw serializations have no
        # file header ("assumed RDS"): both expected here.
        warnings.simplefilter("ignore")
        return _read_lazyload_db_quietly(rdata, data_dir)


def _read_lazyload_db_quietly(rdata, data_dir: Path) -> dict:
    index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / "Rdata.rdx"))
    compressed = int(index["compressed"][0])
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset):int(offset) + int(length)]
        (size,) = struct.unpack(">I", entry[:4])
        if compressed in (2, 3):
            kind, payload = entry[4:5], entry[5:]
            data = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                    b"0": bytes}[kind](payload)
        else:
            data = zlib.decompress(entry[4:])
        if len(data) != size:
            raise ValueError(f"{data_dir}: entry {name} decompressed to {len(data)} bytes, "
                             f"expected {size}")
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out
