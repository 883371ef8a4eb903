"""nbdinfo --map and libnbd block status match the file's holes; sparse reads
come back as holes, not zeros on the wire."""
import json
import os

import nbd

from strata_test import Server, main, run, workdir


def file_data_ranges(path):
    """Data ranges from SEEK_DATA/SEEK_HOLE: the oracle."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            off = hole
    finally:
        os.close(fd)
    return out


def test_map_matches_file_holes():
    with workdir() as d:
        img = os.path.join(d, "sparse.raw")
        with open(img, "wb") as f:
            f.truncate(16 << 20)
            for off in (0, 3 << 20, 9 << 20):
                f.seek(off)
                f.write(b"\xaa" * (256 << 10))
        with Server(img, "--format", "raw", "--read-only") as srv:
            m = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
            data = [(e["offset"], e["length"]) for e in m if not (e["type"] & 1)]
            merged = []
            for off, ln in data:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + ln)
                else:
                    merged.append((off, ln))
            assert merged == file_data_ranges(img), (merged, file_data_ranges(img))
            for e in m:  # holes read as zeros: both flags
                if e["type"] & 1:
                    assert e["type"] == 3, e
            depth = json.loads(run(["nbdinfo", "--map=qemu:allocation-depth", "--json",
                                    srv.uri]).stdout)
            assert {e["type"] for e in depth} <= {0, 1}, depth


def test_sparse_read_sends_holes():
    with workdir() as d:
        img = os.path.join(d, "sparse.raw")
        with open(img, "wb") as f:
            f.truncate(8 << 20)
            f.seek(1 << 20)
            f.write(b"\x55" * 4096)
        with Server(img, "--format", "raw", "--read-only") as srv:
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.add_meta_context("qemu:allocation-depth")
            h.connect_uri(srv.uri)
            chunks = []

            def chunk(subbuf, offset, status, err):
                chunks.append((status, offset, len(subbuf)))
                return 0

            buf = h.pread_structured(4 << 20, 0, chunk)
            assert buf[(1 << 20):(1 << 20) + 4096] == b"\x55" * 4096
            assert buf[:1 << 20] == bytes(1 << 20)
            holes = [c for c in chunks if c[0] == nbd.READ_HOLE]
            data = [c for c in chunks if c[0] == nbd.READ_DATA]
            assert sum(c[2] for c in holes) >= 3 << 20, chunks
            assert sum(c[2] for c in data) < 1 << 20, chunks
            # REQ_ONE returns a single extent.
            seen = []
            h.block_status(8 << 20, 0,
                           lambda meta, off, entries, err: seen.append((meta, list(entries))),
                           nbd.CMD_FLAG_REQ_ONE)
            for meta, entries in seen:
                assert len(entries) == 2, (meta, entries)
            h.shutdown()


if __name__ == "__main__":
    main([test_map_matches_file_holes, test_sparse_read_sends_holes])
