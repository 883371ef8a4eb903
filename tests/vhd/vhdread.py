"""A small, independent VHD reader for tests (written from the spec, shares no
code with the C++ driver): fixed, dynamic and differencing images, with the
parent given explicitly. Sector bitmaps are honoured per sector, MSB first,
which libvhdi gets wrong (docs/FORMATS.md A13).

    img = Vhd("child.vhd", parent=Vhd("base.vhd"))
    data = img.read(0, img.size)
"""
import struct

SECTOR = 512


def checksum(buf, off):
    s = sum(buf[:off]) + sum(buf[off + 4:])
    return (~s) & 0xFFFFFFFF


def parse_footer(b):
    assert len(b) == 512 and b[:8] == b"conectix", "no footer cookie"
    assert struct.unpack(">I", b[64:68])[0] == checksum(b, 64), "footer checksum"
    return {
        "data_offset": struct.unpack(">Q", b[16:24])[0],
        "creator": b[28:32],
        "current_size": struct.unpack(">Q", b[48:56])[0],
        "type": struct.unpack(">I", b[60:64])[0],
        "uuid": bytes(b[68:84]),
    }


class Vhd:
    def __init__(self, path, parent=None):
        self.path = path
        with open(path, "rb") as f:
            self.data = f.read()
        self.footer = parse_footer(self.data[-512:])
        self.size = self.footer["current_size"]
        self.type = self.footer["type"]
        self.parent = parent
        if self.type == 2:
            return
        h = self.data[self.footer["data_offset"]:self.footer["data_offset"] + 1024]
        assert h[:8] == b"cxsparse", "no header cookie"
        assert struct.unpack(">I", h[36:40])[0] == checksum(h, 36), "header checksum"
        self.table_offset = struct.unpack(">Q", h[16:24])[0]
        self.entries = struct.unpack(">I", h[28:32])[0]
        self.block_size = struct.unpack(">I", h[32:36])[0]
        self.parent_id = bytes(h[40:56])
        self.bat = struct.unpack(">%dI" % self.entries,
                                 self.data[self.table_offset:self.table_offset + 4 * self.entries])
        spb = self.block_size // SECTOR
        # One bit per sector, in whole bytes, padded to whole sectors (never 0).
        self.bitmap_bytes = (((spb + 7) // 8 + SECTOR - 1) // SECTOR) * SECTOR
        if self.type == 4:
            assert parent is not None, "differencing image needs a parent"
            assert parent.footer["uuid"] == self.parent_id, "parent id mismatch"

    def _below(self, off, n):
        if self.type != 4:
            return bytes(n)
        p = self.parent
        if off >= p.size:
            return bytes(n)
        m = min(n, p.size - off)
        return p.read(off, m) + bytes(n - m)

    def read_sector(self, s):
        off = s * SECTOR
        if self.type == 2:
            return self.data[off:off + SECTOR]
        blk, i = divmod(off, self.block_size)
        i //= SECTOR
        e = self.bat[blk]
        if e == 0xFFFFFFFF:
            return self._below(off, SECTOR)
        bm = self.data[e * SECTOR + (i >> 3)]
        if not bm & (0x80 >> (i & 7)):
            return self._below(off, SECTOR)
        pos = e * SECTOR + self.bitmap_bytes + i * SECTOR
        return self.data[pos:pos + SECTOR]

    def read(self, off, n):
        out = bytearray()
        first, last = off // SECTOR, (off + n + SECTOR - 1) // SECTOR
        for s in range(first, last):
            out += self.read_sector(s)
        start = off - first * SECTOR
        return bytes(out[start:start + n])

    def read_all(self):
        return self.read(0, self.size)
