"""VHD exports through a real `strata serve` and real NBD clients.

Oracles: qemu-img (fixed/dynamic), pyvhdi (differencing, 4 KiB-aligned data
only: docs/FORMATS.md A13), vhdread.py (an independent reader written from the
spec) and expected buffers computed here.
"""
import hashlib
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbd  # noqa: E402
from strata_test import (STRATA, Server, file_bytes, holes_supported, log, main,  # noqa: E402
                         nbd_handle, no_data_in, run, workdir)
import vhdread  # noqa: E402

MiB = 1024 * 1024



def write_randomly(h, model, rng, count, max_len):
    """`count` writes of random data at random places, mirrored into `model`."""
    for _ in range(count):
        n = rng.randrange(1, max_len)
        off = rng.randrange(0, len(model) - n)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data

def serve(image, *extra):
    return Server(image, "--format", "vhd", *extra)


def read_all(h):
    size = h.get_size()
    out = bytearray()
    off = 0
    while off < size:
        n = min(4 * MiB, size - off)
        out += h.pread(n, off)
        off += n
    return bytes(out)


def pyvhdi_read(f, size):
    # libvhdi 20210425 also misreads single reads larger than a child's block in
    # a chain whose block sizes differ; 64 KiB reads are read correctly.
    return b"".join(f.read_buffer_at_offset(min(65536, size - o), o)
                    for o in range(0, size, 65536))


def sha(path):
    return hashlib.sha256(file_bytes(path)).hexdigest()


def test_qemu_images_served_byte_identical():
    with workdir() as d:
        for sub in ("dynamic", "fixed", "dynamic,force_size=on"):
            img = os.path.join(d, "q.vhd")
            run(["qemu-img", "create", "-f", "vpc", "-o", "subformat=" + sub, img, "20M"])
            run(["qemu-io", "-f", "vpc", "-c", "write -P 0xab 0 4k", "-c",
                 "write -P 0x11 3M 2M", "-c", "write -P 0x22 19M 512", img])
            ref = os.path.join(d, "ref.raw")
            run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", img, ref])
            with serve(img, "--read-only") as s:
                h = nbd_handle(s.uri)
                assert h.get_size() == os.path.getsize(ref), (sub, h.get_size())
                assert read_all(h) == file_bytes(ref), sub
                h.shutdown()
            os.remove(img)


def test_writes_read_back_in_qemu_and_pyvhdi():
    import pyvhdi
    with workdir() as d:
        img = os.path.join(d, "w.vhd")
        run([STRATA, "create", "-f", "vhd", "-o", "type=dynamic,block_size=512K", img, "12M"])
        rng = random.Random(7)
        with serve(img) as s:
            h = nbd_handle(s.uri)
            model = bytearray(h.get_size())
            write_randomly(h, model, rng, 80, 200000)
            h.zero(100000, 5000)
            model[5000:105000] = bytes(100000)
            h.flush()
            assert read_all(h) == bytes(model)
            h.shutdown()
        exp = os.path.join(d, "expect.raw")
        with open(exp, "wb") as f:
            f.write(model)
        run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", img, exp])
        v = pyvhdi.file()
        v.open(img)
        assert pyvhdi_read(v, len(model)) == bytes(model)
        v.close()
        assert vhdread.Vhd(img).read_all() == bytes(model)
        run([STRATA, "check", img])


def make_chain(d, base_type="fixed"):
    """base (fixed or dynamic, data from qemu-io) <- mid (2 MiB blocks) <- top
    (512 KiB blocks, parent in another directory). Returns paths and the model."""
    os.makedirs(os.path.join(d, "base"))
    os.makedirs(os.path.join(d, "kids"))
    base = os.path.join(d, "base", "base.vhd")
    mid = os.path.join(d, "kids", "mid.vhd")
    top = os.path.join(d, "kids", "top.vhd")
    run([STRATA, "create", "-f", "vhd", "-o", "type=" + base_type, base, "16M"])
    run(["qemu-io", "-f", "vpc", "-c", "write -P 0x5a 0 6M", "-c", "write -P 0x6b 10M 1M", base])
    run([STRATA, "create", "-f", "vhd", "-o", "locators=w2ru+macx", "-b", "../base/base.vhd",
         mid])
    run([STRATA, "create", "-f", "vhd", "-o", "block_size=512K,locators=w2ku", "-b", "mid.vhd",
         top])
    ref = os.path.join(d, "base.raw")
    run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", base, ref])
    return base, mid, top, bytearray(file_bytes(ref))


def chain_reader(base, mid, top):
    return vhdread.Vhd(top, parent=vhdread.Vhd(mid, parent=vhdread.Vhd(base)))


def test_chain_4k_writes_agree_with_pyvhdi():
    import pyvhdi
    with workdir() as d:
        base, mid, top, model = make_chain(d)
        rng = random.Random(11)
        with serve(mid, "--allowed-dir", d) as s:
            h = nbd_handle(s.uri)
            for _ in range(30):
                n = 4096 * rng.randrange(1, 40)
                off = 4096 * rng.randrange(0, (len(model) - n) // 4096)
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
            h.flush()
            h.shutdown()
        hashes = (sha(base), sha(mid))
        with serve(top, "--allowed-dir", d) as s:
            h = nbd_handle(s.uri)
            assert read_all(h) == bytes(model)
            for _ in range(30):
                n = 4096 * rng.randrange(1, 40)
                off = 4096 * rng.randrange(0, (len(model) - n) // 4096)
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
            h.zero(64 * 1024, 8192)
            model[8192:8192 + 64 * 1024] = bytes(64 * 1024)
            h.flush()
            assert read_all(h) == bytes(model)
            h.shutdown()
        assert (sha(base), sha(mid)) == hashes, "a parent was written"
        files = [pyvhdi.file() for _ in range(3)]
        for f, p in zip(files, (base, mid, top)):
            f.open(p)
        files[1].set_parent(files[0])
        files[2].set_parent(files[1])
        assert pyvhdi_read(files[2], len(model)) == bytes(model)
        assert chain_reader(base, mid, top).read_all() == bytes(model)


def test_allocation_depth_through_chain():
    with workdir() as d:
        base, mid, top, model = make_chain(d, base_type="dynamic")
        with serve(mid, "--allowed-dir", d) as s:
            h = nbd_handle(s.uri)
            h.pwrite(b"\x01" * 4096, 2 * MiB)
            h.shutdown()
        with serve(top, "--allowed-dir", d) as s:
            h = nbd.NBD()
            h.add_meta_context("qemu:allocation-depth")
            h.add_meta_context("base:allocation")
            h.connect_uri(s.uri)
            h.pwrite(b"\x02" * 4096, 8 * MiB)
            depth = {}

            def cb(meta, off, entries, err):
                if meta == "qemu:allocation-depth":
                    pos = off
                    for i in range(0, len(entries), 2):
                        depth[pos] = entries[i + 1]
                        pos += entries[i]
                return 0

            def depth_at(off):
                depth.clear()
                h.block_status(512, off, cb)
                return depth[off]

            assert depth_at(8 * MiB) == 1
            assert depth_at(2 * MiB) == 2
            assert depth_at(0) == 3
            assert depth_at(13 * MiB) == 0
            h.shutdown()
        # The image tool shows the same layers.
        import json
        m = json.loads(run([STRATA, "map", "--output=json", top]).stdout)
        by_start = {e["start"]: e for e in m}
        assert by_start[0]["depth"] == 3 and by_start[0]["file"] == os.path.realpath(base)
        info = json.loads(run([STRATA, "info", "--output=json", top]).stdout)
        assert info["format-specific"]["subformat"] == "differencing"
        assert info["parent"]["parent"]["filename"] == os.path.realpath(base)
        run([STRATA, "check", top])


def block_depths(uri, offsets):
    h = nbd.NBD()
    h.add_meta_context("qemu:allocation-depth")
    h.connect_uri(uri)
    out = []
    for off in offsets:
        got = {}

        def cb(meta, start, entries, err):
            if meta == "qemu:allocation-depth":
                got.setdefault("d", entries[1])
            return 0

        h.block_status(512, off, cb)
        out.append(got["d"])
    h.shutdown()
    return out


def test_allocation_depth_under_qcow2_overlay():
    with workdir() as d:
        base = os.path.join(d, "b.vhd")
        child = os.path.join(d, "c.vhd")
        ov = os.path.join(d, "ov.qcow2")
        run([STRATA, "create", "-f", "vhd", "-o", "force_size=on", base, "8M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 1M", base])
        run([STRATA, "create", "-f", "vhd", "-b", "b.vhd", child])
        with serve(child) as s:
            h = nbd_handle(s.uri)
            h.pwrite(b"\x03" * 4096, 2 * MiB)
            h.shutdown()
        run(["qemu-img", "create", "-f", "qcow2", "-b", "c.vhd", "-F", "vpc", ov])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 4M 64k", ov])
        with Server(ov, "--format", "qcow2") as s:
            assert block_depths(s.uri, [4 * MiB, 2 * MiB, 0, 6 * MiB]) == [1, 2, 3, 0]
            h = nbd_handle(s.uri)
            data = h.pread(8 * MiB, 0)
            h.shutdown()
        assert data[:MiB] == b"\x01" * MiB
        assert data[2 * MiB:2 * MiB + 4096] == b"\x03" * 4096
        assert data[4 * MiB:4 * MiB + 65536] == b"\x02" * 65536
        assert data.count(0) == 8 * MiB - MiB - 4096 - 65536


def run_workload(h, model, seed, nops, inflight=64, trimmed=None):
    """Random non-overlapping writes (unaligned, sector-partial), zeroes, trims and
    flushes with up to `inflight` commands in flight; updates `model` and marks
    trimmed bytes in `trimmed` (a trimmed byte reads as zero or as before)."""
    rng = random.Random(seed)
    size = len(model)
    if trimmed is None:
        trimmed = bytearray(size)
    busy = {}
    keep = {}
    issued = 0
    assert h.can_trim()
    while issued < nops or busy:
        for c in list(busy):
            if h.aio_command_completed(c):
                del busy[c]
                keep.pop(c, None)
        if issued < nops and h.aio_in_flight() < inflight:
            r = rng.random()
            if r < 0.04:
                busy[h.aio_flush()] = (0, 0)
                issued += 1
                continue
            n = rng.choice([rng.randrange(1, 600), rng.randrange(1, 5000),
                            512 * rng.randrange(1, 9), rng.randrange(1, 300000)])
            off = rng.randrange(0, size - n)
            if any(off < b and a < off + n for a, b in busy.values()):
                continue
            if r < 0.8:
                data = bytearray(rng.randbytes(n))
                buf = nbd.Buffer.from_bytearray(data)
                c = h.aio_pwrite(buf, off)
                keep[c] = buf
                model[off:off + n] = data
                trimmed[off:off + n] = bytes(n)
            elif r < 0.9:
                c = h.aio_zero(n, off)
                model[off:off + n] = bytes(n)
                trimmed[off:off + n] = bytes(n)
            else:
                c = h.aio_trim(n, off)
                trimmed[off:off + n] = b"\x01" * n
            busy[c] = (off, off + n)
            issued += 1
        elif h.aio_in_flight() > 0:
            h.poll(-1)
    return trimmed


def settle_trims(model, trimmed, got):
    """Checks `got` (the disk read back) against `model`: equal everywhere except
    in trimmed bytes, which must read as zero or as their last written value
    (never stale or foreign data). Then takes the trimmed bytes from `got`, so
    that offline readers are held to exactly what NBD returned."""
    assert len(got) == len(model)
    for m in re.finditer(rb"\x01+", trimmed):
        a, b = m.span()
        for i in range(a, b):
            if got[i] != model[i]:
                assert got[i] == 0, f"trimmed byte {i} reads {got[i]}, not 0 or {model[i]}"
        model[a:b] = got[a:b]
    assert bytes(model) == got, "untrimmed data differs"
    return sum(1 for _ in re.finditer(rb"\x01+", trimmed))


def test_random_workload_64_in_flight():
    with workdir() as d:
        base, mid, top, model = make_chain(d)
        hashes = (sha(base), sha(mid))
        with serve(top, "--allowed-dir", d) as s:
            h = nbd_handle(s.uri)
            trimmed = run_workload(h, model, seed=1234, nops=1500)
            h.flush()
            assert settle_trims(model, trimmed, read_all(h)) > 10
            h.shutdown()
        assert (sha(base), sha(mid)) == hashes, "a parent was written"
        assert chain_reader(base, mid, top).read_all() == bytes(model)
        run([STRATA, "check", top])
        # The same on a plain dynamic disk, checked by qemu-img.
        dyn = os.path.join(d, "dyn.vhd")
        run([STRATA, "create", "-f", "vhd", dyn, "16M"])
        with serve(dyn) as s:
            h = nbd_handle(s.uri)
            model = bytearray(h.get_size())
            trimmed = run_workload(h, model, seed=99, nops=1000)
            h.flush()
            settle_trims(model, trimmed, read_all(h))
            h.shutdown()
        exp = os.path.join(d, "exp.raw")
        with open(exp, "wb") as f:
            f.write(model)
        run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", dyn, exp])
        run([STRATA, "check", dyn])


def test_trim_gives_space_back_and_never_shows_the_parent():
    with workdir() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        run([STRATA, "create", "-f", "vhd", base, "8M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 8M", base])
        run([STRATA, "create", "-f", "vhd", "-b", "base.vhd", child], cwd=d)
        parent_hash = sha(base)
        with serve(child) as s:
            h = nbd_handle(s.uri)
            assert h.can_trim()
            # 2 MiB blocks: block 0 all child data, block 1 child data in its
            # first half (bits set) and the parent in its second (bits clear).
            h.pwrite(b"\x22" * (3 * MiB), 0)
            h.flush()
            h.trim(2 * MiB, 0)
            h.trim(6 * MiB, 2 * MiB, nbd.CMD_FLAG_FUA)  # blocks 2-3 are unallocated
            data = h.pread(8 * MiB, 0)
            h.shutdown()
        # Where the child had data it now reads zeros, never the parent; where
        # it had none the parent still shows.
        assert data[:3 * MiB] == bytes(3 * MiB)
        assert data[3 * MiB:] == b"\x11" * (5 * MiB)
        assert sha(base) == parent_hash, "the parent was written"
        run([STRATA, "check", child])
        v = vhdread.Vhd(child, parent=vhdread.Vhd(base))
        offline = v.read_all()
        assert offline[:8 * MiB] == data  # the size has CHS rounding past 8 MiB
        # What the format promises: blocks 0 and 1 stay in the BAT (so the
        # parent never shows through), 2 and 3 were never allocated, and the
        # data areas of 0 and 1 hold no data any more: the space went back to
        # the file system (asked with SEEK_DATA, not by counting its blocks).
        assert [e != 0xFFFFFFFF for e in v.bat[:4]] == [True, True, False, False], v.bat[:4]
        if holes_supported(d):
            for block in (0, 1):
                start = v.bat[block] * 512 + v.bitmap_bytes
                assert no_data_in(child, start, start + 2 * MiB), f"block {block} still has data"
        else:
            log("no hole punching here: not checking that the space was given back")


def test_small_block_sizes_open_and_keep_data():
    """Blocks of 1, 2, 4 and 8 sectors still carry a one-sector bitmap (the spec
    pads it to a sector): such images open, and what is written reads back
    through a new server and offline. libvhdi refuses blocks under 4 KiB, and
    QEMU gives them no bitmap at all, so those two check the 4 KiB case only."""
    import pyvhdi
    with workdir() as d:
        for bs in (512, 1024, 2048, 4096):
            img = os.path.join(d, f"b{bs}.vhd")
            run([STRATA, "create", "-f", "vhd", "-o", f"type=dynamic,block_size={bs}", img, "3M"])
            rng = random.Random(bs)
            with serve(img) as s:
                h = nbd_handle(s.uri)
                model = bytearray(h.get_size())
                write_randomly(h, model, rng, 40, 20000)
                h.zero(3000, 70000)
                model[70000:73000] = bytes(3000)
                h.flush()
                assert read_all(h) == bytes(model), bs
                h.shutdown()
            with serve(img, "--read-only") as s:
                h = nbd_handle(s.uri)
                assert read_all(h) == bytes(model), bs
                h.shutdown()
            assert vhdread.Vhd(img).read_all()[:len(model)] == bytes(model), bs
            run([STRATA, "check", img])
            if bs == 4096:
                exp = os.path.join(d, "expect.raw")
                with open(exp, "wb") as f:
                    f.write(model)
                run(["qemu-img", "compare", "-f", "vpc", "-F", "raw", img, exp])
                v = pyvhdi.file()
                v.open(img)
                assert pyvhdi_read(v, len(model)) == bytes(model)
                v.close()


def test_small_block_child_shows_the_parent_per_sector():
    with workdir() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        run([STRATA, "create", "-f", "vhd", base, "2M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 0x33 0 2M", base])
        run([STRATA, "create", "-f", "vhd", "-o", "block_size=1024", "-b", "base.vhd", child],
            cwd=d)
        model = bytearray(b"\x33" * (2 * MiB))
        with serve(child) as s:
            h = nbd_handle(s.uri)
            for off, n in ((0, 512), (1536, 700), (4096, 3000), (MiB - 100, 200)):
                h.pwrite(b"\x44" * n, off)
                model[off:off + n] = b"\x44" * n
            h.flush()
            got = h.pread(2 * MiB, 0)
            h.shutdown()
        assert got == bytes(model)
        offline = vhdread.Vhd(child, parent=vhdread.Vhd(base)).read(0, 2 * MiB)
        assert offline == bytes(model)
        run([STRATA, "check", child])


def test_refusals_name_the_file():
    with workdir() as d:
        base = os.path.join(d, "b.vhd")
        child = os.path.join(d, "c.vhd")
        run([STRATA, "create", "-f", "vhd", base, "4M"])
        run([STRATA, "create", "-f", "vhd", "-b", "b.vhd", child])
        os.remove(base)
        p = run([STRATA, "info", child], check=False)
        assert p.returncode != 0
        assert "c.vhd" in p.stderr + p.stdout and "parent" in p.stderr + p.stdout
        srv = Server(child, "--format", "vhd", expect_fail=True)
        srv.start()
        srv.proc.wait(timeout=30)
        text = srv.stop(check=False)
        assert srv.proc.returncode != 0
        assert "c.vhd" in text, text


if __name__ == "__main__":
    main([test_qemu_images_served_byte_identical, test_writes_read_back_in_qemu_and_pyvhdi,
          test_chain_4k_writes_agree_with_pyvhdi, test_allocation_depth_through_chain,
          test_allocation_depth_under_qcow2_overlay,
          test_random_workload_64_in_flight,
          test_trim_gives_space_back_and_never_shows_the_parent,
          test_small_block_sizes_open_and_keep_data,
          test_small_block_child_shows_the_parent_per_sector, test_refusals_name_the_file])
