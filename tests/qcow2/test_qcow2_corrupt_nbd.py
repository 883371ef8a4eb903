"""Truncated and inconsistent qcow2 images through a real `strata serve`
(docs/CORRUPT-IMAGES.md): a truncated image is reported by `strata check` as
`qemu-img check` does, reads zeros where its clusters are gone, and a write
never lands on a cluster that is still referenced; an allocation that would
hit metadata in use marks the image corrupt (the v3 header bit), fails with
EIO and leaves the export read-only; an image with the corrupt bit set is
refused read-write and served read-only. qemu-img, qemu-io and libnbd are the
oracles."""
import json
import os
import struct

import nbd

from strata_test import STRATA, Server, main, run, workdir

CS = 4096  # cluster size of every image here


def create(d, name, size, opts=""):
    img = os.path.join(d, name)
    o = f"cluster_size={CS}" + ("," + opts if opts else "")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", o, img, size])
    return img


def qemu_io(img, *cmds, read_only=False):
    args = ["qemu-io", "-f", "qcow2"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    p = run(args + [img])
    assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p


def be64_at(img, off):
    with open(img, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def l1_entry(img, i):
    return be64_at(img, be64_at(img, 40) + 8 * i) & 0x00fffffffffffe00


def set_refcount(img, cluster, value):
    """16-bit refcounts, all in the first refcount block."""
    block = be64_at(img, be64_at(img, 48)) & ~0x1ff
    with open(img, "r+b") as f:
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", value))


def host_offsets(img):
    """guest offset -> host offset of every data cluster (qemu-img map)."""
    out = {}
    for e in json.loads(run(["qemu-img", "map", "--output=json", img]).stdout):
        if e["data"] and "offset" in e:
            for k in range(0, e["length"], CS):
                out[e["start"] + k] = e["offset"] + k
    return out


def qemu_check(img):
    return run(["qemu-img", "check", img], check=False)


def qemu_info(img):
    return json.loads(run(["qemu-img", "info", "--output=json", "-U", img]).stdout)


def nbd_errno(fn, *args):
    """The errno name ("EIO") a request failed with, or None."""
    try:
        fn(*args)
    except nbd.Error as e:
        return e.errno
    return None


def truncated_image(d):
    """The image of the report: data at guest 0, 8K and 16K, then the file
    loses its last cluster (the one holding guest 16K)."""
    img = create(d, "t.qcow2", "1M")
    qemu_io(img, "write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 16k 4k")
    assert host_offsets(img)[16384] == os.path.getsize(img) - CS
    os.truncate(img, os.path.getsize(img) - CS)
    return img


def test_check_reports_references_past_eof():
    with workdir() as d:
        img = truncated_image(d)
        q = qemu_check(img)
        assert q.returncode == 2 and "exceeding the end of the file" in q.stderr, q.stderr
        p = run([STRATA, "check", img], check=False)
        assert p.returncode == 2, p.stdout + p.stderr
        assert "past the end of the file" in p.stdout, p.stdout
        assert "No errors were found" not in p.stdout, p.stdout


def test_truncated_image_reads_zeros_and_writes_never_alias():
    with workdir() as d:
        img = truncated_image(d)
        qemu_io(img, "read -P 0 16k 4k", read_only=True)  # QEMU reads zeros there
        with Server(img, "--format", "qcow2") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            assert not h.is_read_only()
            assert h.pread(CS, 16384) == bytes(CS)
            h.pwrite(b"\x64" * CS, 65536)
            h.pwrite(b"\x65" * CS, 20480)
            h.flush()
            assert h.pread(CS, 0) == b"\x01" * CS
            assert h.pread(CS, 8192) == b"\x02" * CS
            assert h.pread(CS, 16384) == bytes(CS)
            assert h.pread(CS, 65536) == b"\x64" * CS
            h.shutdown()
        hosts = host_offsets(img)
        assert len(set(hosts.values())) == len(hosts), f"two guest clusters share a host cluster: {hosts}"
        qemu_io(img, "read -P 1 0 4k", "read -P 2 8k 4k", "read -P 0 16k 4k",
                "read -P 0x65 20k 4k", "read -P 0x64 64k 4k", read_only=True)
        # The lost cluster is a hole inside the file now: the image is consistent again.
        q = qemu_check(img)
        assert q.returncode == 0, q.stdout + q.stderr


def test_writing_the_lost_cluster_keeps_it_private():
    with workdir() as d:
        img = truncated_image(d)
        with Server(img, "--format", "qcow2") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            h.pwrite(b"\x33" * 512, 16384 + 512)
            h.pwrite(b"\x44" * CS, 32768)
            h.flush()
            h.shutdown()
        hosts = host_offsets(img)
        assert len(set(hosts.values())) == len(hosts), hosts
        qemu_io(img, "read -P 0 16k 512", "read -P 0x33 16896 512", "read -P 0 17408 3k",
                "read -P 0x44 32k 4k", read_only=True)
        q = qemu_check(img)
        assert q.returncode == 0, q.stdout + q.stderr


def test_truncated_l2_table_reads_zeros_and_is_rewritten_in_place():
    with workdir() as d:
        img = create(d, "t2.qcow2", "4M")
        qemu_io(img, "write -P 1 0 4k", "write -P 2 2M 4k")
        l2 = l1_entry(img, 1)
        assert l2 == os.path.getsize(img) - 2 * CS, "layout assumed by the test"
        os.truncate(img, l2)  # the L2 table of guest 2M and its data cluster
        with Server(img, "--format", "qcow2") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            assert h.pread(CS, 2 << 20) == bytes(CS)
            h.pwrite(b"\x22" * CS, (2 << 20) + CS)
            h.pwrite(b"\x23" * CS, 3 << 20)
            h.flush()
            h.shutdown()
        assert l1_entry(img, 1) == l2
        hosts = host_offsets(img)
        assert len(set(hosts.values())) == len(hosts), hosts
        assert all(off != l2 + CS for off in hosts.values()), "the lost data cluster was reused"
        qemu_io(img, "read -P 1 0 4k", "read -P 0 2M 4k", "read -P 0x22 2052k 4k",
                "read -P 0x23 3M 4k", read_only=True)
        q = qemu_check(img)
        assert q.returncode in (0, 3) and "ERROR" not in q.stdout + q.stderr, q.stdout + q.stderr


def l2_with_refcount_0(d, compat):
    """Data at guest 0 and 8K under one L2 table, 2M under a second one whose
    refcount is then set to 0 (inconsistent: the L1 table still uses it)."""
    img = create(d, "r.qcow2", "4M", "compat=" + compat)
    qemu_io(img, "write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 2M 4k")
    l2 = l1_entry(img, 1)
    assert l2 and l2 // CS > host_offsets(img)[8192] // CS, "layout assumed by the test"
    set_refcount(img, l2 // CS, 0)
    assert qemu_check(img).returncode == 2
    return img


def provoke_allocation_over_the_l2_table(srv):
    """Frees guest 0's cluster, then allocates twice: the second allocation
    scans up to the L2 table whose refcount is 0."""
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.trim(CS, 0)
    h.flush()
    h.pwrite(b"\x07" * CS, 4096)
    err = nbd_errno(h.pwrite, b"\x08" * CS, 12288)
    return h, err


def test_allocation_over_metadata_marks_corrupt_and_goes_read_only():
    with workdir() as d:
        img = l2_with_refcount_0(d, "1.1")
        with Server(img, "--format", "qcow2") as srv:
            h, err = provoke_allocation_over_the_l2_table(srv)
            assert err == "EIO", err
            assert nbd_errno(h.pwrite, b"\x09" * CS, 0) in ("EPERM", "EIO")
            assert nbd_errno(h.trim, CS, 8192) in ("EPERM", "EIO")
            assert h.pread(CS, 2 << 20) == b"\x03" * CS
            assert h.pread(CS, 4096) == b"\x07" * CS
            assert h.pread(CS, 8192) == b"\x02" * CS
            h.shutdown()
            log = srv.stop()
        lines = [ln for ln in log.splitlines() if "marking image as corrupt" in ln]
        assert len(lines) == 1 and img in lines[0] and "L2" in lines[0], log
        assert qemu_info(img)["format-specific"]["data"]["corrupt"] is True
        qemu_io(img, "read -P 3 2M 4k", "read -P 7 4k 4k", "read -P 2 8k 4k", read_only=True)


def test_allocation_over_metadata_v2_goes_read_only():
    with workdir() as d:
        img = l2_with_refcount_0(d, "0.10")
        with Server(img, "--format", "qcow2") as srv:
            h, err = provoke_allocation_over_the_l2_table(srv)
            assert err == "EIO", err
            assert nbd_errno(h.pwrite, b"\x09" * CS, 0) in ("EPERM", "EIO")
            assert h.pread(CS, 2 << 20) == b"\x03" * CS
            h.shutdown()
        qemu_io(img, "read -P 3 2M 4k", "read -P 7 4k 4k", read_only=True)


def test_corrupt_bit_refused_read_write_served_read_only():
    with workdir() as d:
        img = create(d, "c.qcow2", "1M")
        qemu_io(img, "write -P 5 0 4k")
        with open(img, "r+b") as f:
            f.seek(72)
            f.write(struct.pack(">Q", 2))
        srv = Server(img, "--format", "qcow2", expect_fail=True).start()
        srv.proc.wait(timeout=30)
        log = srv.stop(check=False)
        assert srv.proc.returncode != 0, log
        assert "corrupt" in log and img in log, log
        with Server(img, "--format", "qcow2", "--read-only") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            assert h.is_read_only()
            assert h.pread(CS, 0) == b"\x05" * CS
            h.shutdown()


if __name__ == "__main__":
    main([test_check_reports_references_past_eof,
          test_truncated_image_reads_zeros_and_writes_never_alias,
          test_writing_the_lost_cluster_keeps_it_private,
          test_truncated_l2_table_reads_zeros_and_is_rewritten_in_place,
          test_allocation_over_metadata_marks_corrupt_and_goes_read_only,
          test_allocation_over_metadata_v2_goes_read_only,
          test_corrupt_bit_refused_read_write_served_read_only])
