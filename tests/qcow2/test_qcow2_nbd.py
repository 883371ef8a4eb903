"""qcow2 through a real `strata serve`: Part D variants read over NBD equal
`qemu-img convert -O raw`, `nbdinfo --map` agrees with `qemu-img map`,
allocation depth across a mixed chain, and a seeded random workload with 64
requests in flight (python3-libnbd) that `qemu-img check` calls clean and
`qemu-img compare` finds equal to the expected content."""
import json
import os
import random
import shutil

import nbd

from strata_test import Server, file_bytes, holes_supported, main, no_data_in, run, workdir


def qemu_raw(img, d, opts=()):
    out = os.path.join(d, "qemu-out.raw")
    run(["qemu-img", "convert", *opts, "-O", "raw", img, out])
    return file_bytes(out)


def nbd_read_all(uri, size=None):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    out = bytearray()
    step = 4 << 20
    for off in range(0, size, step):
        out += h.pread(min(step, size - off), off)
    h.shutdown()
    return bytes(out)


def qemu_map(img, cwd=None):
    return json.loads(run(["qemu-img", "map", "--output=json", img], cwd=cwd).stdout)


def nbd_map(uri, ctx="base:allocation"):
    return json.loads(run(["nbdinfo", f"--map={ctx}", "--json", uri]).stdout)


def flags_at(m, off, key="offset"):
    for e in m:
        if e[key] <= off < e[key] + e["length"]:
            return e
    raise AssertionError(f"offset {off} not covered")


def check_maps_agree(img, uri, cwd=None, end=None):
    """Block status over NBD agrees with `qemu-img map` (up to `end` if given)."""
    q = qemu_map(img, cwd)
    n = nbd_map(uri)
    for e in q:
        last = e["start"] + e["length"] - 1
        if end is not None:
            if e["start"] >= end:
                continue
            last = min(last, end - 1)
        for off in {e["start"], last}:
            t = flags_at(n, off)["type"]
            assert (not (t & 1)) == e["data"], (img, off, e, t)
            if not e["data"]:
                assert bool(t & 2) == e["zero"], (img, off, e, t)


def make_variants(d):
    """A few Part D variants with data, zeros and compressed clusters."""
    out = []
    src = os.path.join(d, "src.raw")
    run(["qemu-img", "create", "-q", "-f", "raw", src, "16M"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 5M 300k", src])
    for name, opts in [("v2", "compat=0.10"), ("c512", "cluster_size=512"),
                       ("xl2", "extended_l2=on"), ("r1", "refcount_bits=1")]:
        img = os.path.join(d, name + ".qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "16M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 4k 70k", "-c", "write -z 1M 128k",
             "-c", "write -P 0x12 9M 1000", img])
        out.append(img)
    for name, opts in [("cz", []), ("czstd", ["-o", "compression_type=zstd"])]:
        img = os.path.join(d, name + ".qcow2")
        run(["qemu-img", "convert", "-c", "-O", "qcow2", *opts, src, img])
        out.append(img)
    return out


def test_variants_read_and_map():
    with workdir() as d:
        for img in make_variants(d):
            want = qemu_raw(img, d)
            with Server(img, "--format", "qcow2", "--read-only") as srv:
                assert nbd_read_all(srv.uri) == want, img
                check_maps_agree(img, srv.uri)


def test_allocation_depth_mixed_chain():
    with workdir() as d:
        base = os.path.join(d, "base.vhd")
        run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", base, "16M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 0xa1 0 4M", base])
        mid = os.path.join(d, "mid.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.vhd", "-F", "vpc", mid, "16M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xb1 1M 1M", mid])
        top = os.path.join(d, "top.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "16M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xc1 1536k 64k", "-c", "write -z 0 64k", top])
        want = qemu_raw(top, d)
        with Server(top, "--format", "qcow2", "--read-only") as srv:
            assert nbd_read_all(srv.uri) == want
            depth = nbd_map(srv.uri, "qemu:allocation-depth")
            assert flags_at(depth, 0)["type"] == 1          # zero cluster in top
            assert flags_at(depth, 1536 << 10)["type"] == 1  # top data
            assert flags_at(depth, 1 << 20)["type"] == 2     # mid
            assert flags_at(depth, 3 << 20)["type"] == 3     # VHD base
            assert flags_at(depth, 8 << 20)["type"] == 0     # nowhere
            check_maps_agree(top, srv.uri)


def random_workload(uri, expected, seed, nops=1500, span=None, inflight=64):
    """Random aio writes/zeroes/trims/flushes with up to `inflight` requests in
    flight; requests in flight never overlap each other's bytes (they may share
    clusters). Updates `expected` (bytearray)."""
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    span = span or size
    busy = {}  # cookie -> (off, len, kind, data)
    done = 0
    issued = 0

    def overlaps(off, ln):
        return any(off < o + l and o < off + ln for (o, l, _, _) in busy.values())

    while done < nops:
        while issued < nops and len(busy) < inflight:
            off = rnd.randrange(span)
            ln = 1 + rnd.randrange(min(span - off, rnd.choice([600, 5000, 70000, 300000])))
            if rnd.random() < 0.3:
                off &= ~4095
                ln = min(span - off, (ln + 4095) & ~4095)
            if overlaps(off, ln):
                break
            k = rnd.random()
            if k < 0.6:
                data = bytes([rnd.randrange(256)]) * ln
                if rnd.random() < 0.5:
                    data = os.urandom(ln)
                c = h.aio_pwrite(data, off, flags=nbd.CMD_FLAG_FUA if rnd.random() < 0.05 else 0)
                busy[c] = (off, ln, "w", data)
            elif k < 0.8:
                fl = 0 if rnd.random() < 0.5 else nbd.CMD_FLAG_NO_HOLE
                c = h.aio_zero(ln, off, flags=fl)
                busy[c] = (off, ln, "z", None)
            elif k < 0.93:
                c = h.aio_trim(ln, off)
                busy[c] = (off, ln, "t", None)
            else:
                c = h.aio_flush()
                busy[c] = (0, 0, "f", None)
            issued += 1
        finished = [c for c in list(busy) if h.aio_command_completed(c)]
        if not finished:
            h.poll(-1)
            continue
        for c in finished:
            if True:
                off, ln, kind, data = busy.pop(c)
                done += 1
                if kind == "w":
                    expected[off:off + ln] = data
                elif kind == "z":
                    expected[off:off + ln] = bytes(ln)
                elif kind == "t":
                    got = h.pread(ln, off)
                    for i in range(0, ln, 4096):
                        a, b = got[i:i + 4096], expected[off + i:off + i + 4096]
                        if a != b:
                            assert a == bytes(len(a)) or all(x in (0, y) for x, y in zip(a, b)), \
                                f"trim at {off} exposed other data"
                    expected[off:off + ln] = got
    h.flush()
    h.shutdown()


def finish_and_check(img, expected, d, srv, qemu_opts=()):
    srv.stop()
    exp = os.path.join(d, "expected.raw")
    with open(exp, "wb") as f:
        f.write(expected)
    p = run(["qemu-img", "check", *qemu_opts, img], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    p = run(["qemu-img", "compare", *qemu_opts, "-F", "raw", img, exp], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_random_workload_64_in_flight():
    with workdir() as d:
        base = os.path.join(d, "base.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, "24M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 20M", base])
        before = file_bytes(base)
        for seed, opts in [(1, "cluster_size=64k"), (2, "extended_l2=on"), (3, "compat=0.10")]:
            img = os.path.join(d, "top.qcow2")
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 "-o", opts, img, "32M"])
            run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 2M",
                 "-c", "write -c -P 0x22 4M 1M", img])
            if "compat=0.10" in opts:
                run(["qemu-img", "snapshot", "-c", "s1", img])
            expected = bytearray(qemu_raw(img, d))
            srv = Server(img, "--format", "qcow2").start()
            try:
                random_workload(srv.uri, expected, seed, nops=1200)
            finally:
                finish_and_check(img, expected, d, srv)
        assert file_bytes(base) == before, "backing file changed"


def make_data_file_raw(d, size):
    """A qcow2 (dr.qcow2) whose guest data lives in dr.raw with data_file_raw=on."""
    img = os.path.join(d, "dr.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=dr.raw,data_file_raw=on",
         img, size], cwd=d)
    return img, os.path.join(d, "dr.raw")


def test_random_workload_data_file_raw():
    with workdir() as d:
        img, raw = make_data_file_raw(d, "24M")
        expected = bytearray(24 << 20)
        srv = Server(img, "--format", "qcow2").start()
        try:
            random_workload(srv.uri, expected, 7, nops=800)
        finally:
            srv.stop()
        assert file_bytes(raw) == bytes(expected), "raw data file differs from the disk"
        p = run(["qemu-img", "check", img], check=False, cwd=d)
        assert p.returncode == 0, p.stdout + p.stderr


def test_data_file_raw_trim_gives_space_back():
    with workdir() as d:
        img, raw = make_data_file_raw(d, "8M")
        with Server(img, "--format", "qcow2") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            assert h.can_trim()
            h.pwrite(b"\x33" * (4 << 20), 0)
            h.flush()
            h.trim(2 << 20, 1 << 20, nbd.CMD_FLAG_FUA)
            got = h.pread(4 << 20, 0)
            h.shutdown()
        # The space went back: SEEK_DATA finds nothing there (file systems
        # allocate at their own granularity, so blocks are not counted).
        if holes_supported(d):
            assert no_data_in(raw, 1 << 20, 3 << 20), "the trimmed range still has data"
        want = b"\x33" * (1 << 20) + bytes(2 << 20) + b"\x33" * (1 << 20)
        assert got == want
        assert file_bytes(raw)[:4 << 20] == want, "the raw file is not the disk"
        p = run(["qemu-img", "check", img], check=False, cwd=d)
        assert p.returncode == 0, p.stdout + p.stderr


def overwrite(path, data, off=0):
    """Writes into a file the way a tool using the raw data file directly would."""
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def qemu_io_nbd(uri, *cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    p = run(["qemu-io", "-f", "raw", "-r", *args, uri])
    assert "verification failed" not in p.stdout, p.stdout
    return p.stdout


def test_data_file_raw_zero_flags_read_as_zeros():
    """Zero-flagged clusters and subclusters read as zeros with data_file_raw too,
    whatever the data file holds there: every read size (direct and the sparse
    structured read built from block status), block status itself and a
    block-status-driven copy agree with `qemu-img convert` of the image."""
    k = 1024
    cases = [
        # (create options, zero ranges written by QEMU)
        ("", [(0, 64 * k)]),
        (",extended_l2=on", [(0, 4 * k), (66 * k, 2 * k)]),
    ]
    for opts, zeros in cases:
        with workdir() as d:
            img = os.path.join(d, "dr.qcow2")
            raw = os.path.join(d, "dr.raw")
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "data_file=dr.raw,data_file_raw=on" + opts, img, "1M"], cwd=d)
            cmds = ["-c", "write -P 1 0 128k"]
            for off, n in zeros:
                cmds += ["-c", f"write -z {off} {n}"]
            run(["qemu-io", "-f", "qcow2", *cmds, img], cwd=d)
            overwrite(raw, b"\x5a" * (128 * k))
            # QEMU 7.2 looks for the data file name relative to the cwd.
            run(["qemu-img", "convert", "-O", "raw", img, "want.raw"], cwd=d)
            want = file_bytes(os.path.join(d, "want.raw"))
            for off, n in zeros:
                assert want[off:off + n] == bytes(n), (opts, off)
            assert want[64 * k:66 * k] == b"\x5a" * (2 * k), opts
            with Server(img, "--format", "qcow2", "--read-only") as srv:
                off, n = zeros[0]
                qemu_io_nbd(srv.uri, f"read -P 0 {off} {n}", f"read -P 0 {off} 4k",
                            f"read -P 0x5a 64k 2k")
                if n == 64 * k:
                    qemu_io_nbd(srv.uri, "read -P 0 0 64k", "read -P 0x5a 64k 64k")
                h = nbd.NBD()
                h.connect_uri(srv.uri)
                for step in (4 * k, 64 * k, 1 << 20):
                    got = b"".join(h.pread(step, o) for o in range(0, len(want), step))
                    assert got == want, (opts, step)
                    n = min(step, len(want) - 1000)  # unaligned, across the zero range
                    assert h.pread(n, 1000) == want[1000:1000 + n], (opts, step)
                h.shutdown()
                # Past 128k the extended L2 entries have empty bitmaps, which
                # QEMU reads as zeros and Strata as the data file (docs/FORMATS.md B10).
                check_maps_agree(img, srv.uri, cwd=d, end=128 * k)
                out = os.path.join(d, "copy.raw")
                run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out])
                assert file_bytes(out) == want, opts



def test_data_file_raw_partial_write_into_zero_cluster():
    """A write into part of a zero-flagged cluster (or of a zero subcluster)
    under data_file_raw leaves the rest of it reading as zeros, through Strata
    and through QEMU afterwards, though the data file held other bytes there;
    the data file stays the disk (`qemu-img convert` of the image equals it)."""
    k = 1024
    for opts, zero_len in (("", 64 * k), (",extended_l2=on", 4 * k)):
        with workdir() as d:
            img = os.path.join(d, "pw.qcow2")
            raw = os.path.join(d, "pw.raw")
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                 "data_file=pw.raw,data_file_raw=on" + opts, img, "1M"], cwd=d)
            run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k",
                 "-c", f"write -z 0 {zero_len}", img], cwd=d)
            overwrite(raw, b"\x5a" * (128 * k))
            with Server(img, "--format", "qcow2") as srv:
                h = nbd.NBD()
                h.connect_uri(srv.uri)
                h.pwrite(b"\x07" * 1024, 1024)
                assert h.pread(zero_len, 0) == bytes(1024) + b"\x07" * 1024 + bytes(zero_len - 2048)
                assert h.pread(1024, zero_len) == b"\x5a" * 1024
                h.flush()
                h.shutdown()
            run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0 0 1k",
                 "-c", "read -P 7 1k 1k", "-c", f"read -P 0 2k {zero_len - 2048}", img], cwd=d)
            run(["qemu-img", "check", "-q", img], cwd=d)
            run(["qemu-img", "convert", "-O", "raw", img, "want.raw"], cwd=d)
            assert file_bytes(os.path.join(d, "want.raw"))[:zero_len] == file_bytes(raw)[:zero_len], opts


if __name__ == "__main__":
    main([test_variants_read_and_map, test_allocation_depth_mixed_chain,
          test_random_workload_64_in_flight, test_random_workload_data_file_raw,
          test_data_file_raw_trim_gives_space_back, test_data_file_raw_zero_flags_read_as_zeros,
          test_data_file_raw_partial_write_into_zero_cluster])
