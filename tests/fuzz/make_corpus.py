#!/usr/bin/env python3
"""Regenerates the seed corpora of tests/fuzz/corpus/ (checked in; run this
only to change them).

  tests/fuzz/make_corpus.py --strata build-fuzz/strata --fuzz-dir build-fuzz/tests/fuzz

Images are made by qemu-img / qemu-io and by `strata create`, kept small
(64-256 KiB virtual, 512 B - 16 KiB clusters or blocks). Image seeds carry the
64-byte op script of tests/fuzz/image_ops.h in front of the image. VHD children
are created over the parents fuzz_vhd makes at start-up (same fixed ids).
Protocol seeds are client byte streams (tests/fuzz/fuzz_handshake.cpp and
fuzz_connection.cpp say how they are read). Regression inputs (regress-*)
are never rewritten by this script.
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# ---- op scripts (tests/fuzz/image_ops.h) -----------------------------------

READ, WRITE, ZERO, TRIM, FLUSH, EXTENTS, CACHE = range(7)
FUA, MAY_TRIM, FAST, BYTEWISE = 1, 2, 4, 8


def op(kind, offset_sectors=0, sectors=1, flags=0, p=0, q=0x5a):
    return struct.pack("<BBHHBB", kind, flags, offset_sectors, sectors - 1, p, q)


def script(ops, read_only=False, variant=0, cache_4k=0):
    head = bytes([(variant << 1) | int(read_only), cache_4k]) + bytes(6)
    body = b"".join(ops)[: 7 * 8]
    return head + body + bytes(56 - len(body))


# Writes, then reads them back; zeroes and trims in between.
RW = script([
    op(READ, 0, 128),
    op(WRITE, 8, 16, q=0x11),
    op(EXTENTS, 0, 1),
    op(ZERO, 24, 8, MAY_TRIM),
    op(TRIM, 64, 8),
    op(WRITE, 100, 3, BYTEWISE | FUA, p=7, q=0x22),
    op(READ, 0, 128),
])
# The same with a metadata cache of 8 KiB (tables get evicted and written back).
SMALL_CACHE = script([
    op(WRITE, 0, 8, q=0x33),
    op(WRITE, 40, 8, q=0x44),
    op(WRITE, 90, 8, q=0x55),
    op(FLUSH),
    op(ZERO, 40, 4, FAST),
    op(EXTENTS, 0, 1),
    op(READ, 0, 128),
], cache_4k=2)
READ_ONLY = script([op(READ, 0, 128), op(EXTENTS, 0, 1), op(CACHE, 0, 64)], read_only=True)


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def image_seeds(target, name, path, scripts=(RW,)):
    with open(path, "rb") as f:
        img = f.read()
    tags = {RW: "rw", SMALL_CACHE: "cache", READ_ONLY: "ro"}
    for s in scripts:
        put(target, f"{name}-{tags.get(s, 'x')}", s + img)


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    # `abort` ends qemu-io with SIGABRT on purpose (an image left unclosed).
    r = subprocess.run(args + [path], stdout=subprocess.DEVNULL)
    if r.returncode != 0 and cmds[-1] != "abort":
        raise subprocess.CalledProcessError(r.returncode, args)


# ---- qcow2 ------------------------------------------------------------------

def qcow2_seeds(tmp, strata):
    def create(name, opts, size="64K"):
        p = os.path.join(tmp, name)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, size)
        return p

    p = create("v2-512.qcow2", "compat=0.10,cluster_size=512")
    qemu_io(p, "write -P 0x11 0 4k", "write -P 0x22 20k 1k")
    image_seeds("qcow2", "v2-512", p, (RW, SMALL_CACHE))

    p = create("v3-4k-zero.qcow2", "compat=1.1,cluster_size=4k")
    qemu_io(p, "write -P 0x33 0 16k", "write -z 4k 4k", "write -z -u 8k 4k", "discard 12k 4k")
    image_seeds("qcow2", "v3-4k-zero", p, (RW, READ_ONLY))

    p = create("v3-extl2.qcow2", "compat=1.1,cluster_size=16k,extended_l2=on", "256K")
    qemu_io(p, "write -P 0x44 0 3k", "write -P 0x45 18k 2k", "write -z 40k 1k")
    image_seeds("qcow2", "v3-extl2", p, (RW, SMALL_CACHE))

    raw = os.path.join(tmp, "pattern.raw")
    with open(raw, "wb") as f:
        f.write(b"".join(bytes([i]) * 4096 for i in range(8)) + bytes(32768))
    for ctype in ("zlib", "zstd"):
        p = os.path.join(tmp, f"compressed-{ctype}.qcow2")
        run("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
            f"cluster_size=4k,compression_type={ctype}", raw, p)
        image_seeds("qcow2", f"compressed-{ctype}", p, (RW,))

    for bits in (1, 16, 64):
        p = create(f"refcount{bits}.qcow2", f"cluster_size=512,refcount_bits={bits}")
        qemu_io(p, "write -P 0x66 1k 2k")
        image_seeds("qcow2", f"refcount{bits}", p, (RW,))

    # Lazy refcounts, closed without a flush: the dirty bit stays set.
    p = create("dirty.qcow2", "cluster_size=512,lazy_refcounts=on")
    qemu_io(p, "write -P 0x77 0 2k", "abort")
    image_seeds("qcow2", "dirty", p, (RW,))

    p = create("snapshot.qcow2", "cluster_size=512")
    qemu_io(p, "write -P 0x12 0 2k")
    run("qemu-img", "snapshot", "-c", "snap1", p)
    qemu_io(p, "write -P 0x13 1k 2k")
    image_seeds("qcow2", "snapshot", p, (RW,))

    # Persistent dirty bitmaps: granularities at both ends, one disabled, one
    # left IN_USE by qemu-io's abort.
    p = create("bitmaps.qcow2", "cluster_size=512")
    run("qemu-img", "bitmap", "--add", "-g", "512", p, "fine")
    run("qemu-img", "bitmap", "--add", "-g", "64k", p, "coarse")
    run("qemu-img", "bitmap", "--add", "--disable", p, "off")
    qemu_io(p, "write -P 0x31 1k 3k")
    image_seeds("qcow2", "bitmaps", p, (RW, SMALL_CACHE))
    run("qemu-img", "bitmap", "--add", p, "stale")
    qemu_io(p, "write -P 0x32 8k 1k", "abort")
    image_seeds("qcow2", "bitmaps-in-use", p, (RW,))

    # Issue 14 defect 1: a file truncated by the cluster that holds guest 16K.
    # Serving it must never hand that cluster out again for a new write.
    p = create("truncated.qcow2", "cluster_size=4k", "128K")
    qemu_io(p, "write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 16k 4k")
    os.truncate(p, os.path.getsize(p) - 4096)
    with open(p, "rb") as f:
        put("qcow2", "regress-truncated-no-alias", script([
            op(READ, 32, 8), op(WRITE, 128, 8, q=0x64), op(READ, 32, 8), op(FLUSH),
            op(READ, 0, 256)]) + f.read())

    if strata:
        p = os.path.join(tmp, "strata-512.qcow2")
        run(strata, "create", "-f", "qcow2", "-o", "cluster_size=512", p, "64K")
        qemu_io(p, "write -P 0x21 2k 3k")
        image_seeds("qcow2", "strata-512", p, (RW, SMALL_CACHE))
        p = os.path.join(tmp, "strata-extl2.qcow2")
        run(strata, "create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", p, "128K")
        image_seeds("qcow2", "strata-extl2", p, (RW,))


# ---- VHD --------------------------------------------------------------------

def vhd_seeds(tmp, strata, fuzz_dir):
    def qemu_vpc(name, sub, size="64K"):
        p = os.path.join(tmp, name)
        run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={sub}", p, size)
        return p

    p = qemu_vpc("qemu-fixed.vhd", "fixed")
    qemu_io(p, "write -P 0x31 0 4k", fmt="vpc")
    image_seeds("vhd", "qemu-fixed", p, (RW,))
    p = qemu_vpc("qemu-dynamic.vhd", "dynamic")  # no write: a block is 2 MiB
    image_seeds("vhd", "qemu-dynamic", p, (RW, READ_ONLY))
    if not strata:
        return
    p = os.path.join(tmp, "strata-dynamic.vhd")
    run(strata, "create", "-f", "vhd", "-o", "type=dynamic,block_size=4K", p, "64K")
    qemu_io(p, "write -P 0x34 0 6k", fmt="vpc")
    image_seeds("vhd", "strata-dynamic-4k", p, (RW,))
    # Issue 14 defect 3: blocks of fewer than 8 sectors (a sector bitmap of
    # less than a byte) must open, not divide by zero.
    p = os.path.join(tmp, "strata-dynamic-512.vhd")
    run(strata, "create", "-f", "vhd", "-o", "type=dynamic,block_size=512", p, "64K")
    image_seeds("vhd", "regress-block-size-512", p, (RW,))
    # The same seeds with "fix the checksums" on, for mutations to start from.
    for name in ("strata-dynamic-4k-rw", "qemu-fixed-rw"):
        with open(os.path.join(CORPUS, "vhd", name), "rb") as f:
            data = bytearray(f.read())
        data[0] |= 1 << 4
        put("vhd", name.replace("-rw", "-fixsum"), bytes(data))
    # Differencing children over fuzz_vhd's own parents.
    if not fuzz_dir:
        return
    parents = os.path.join(tmp, "vhd-parents")
    env = dict(os.environ, STRATA_FUZZ_VHD_DIR=parents)
    subprocess.run([os.path.join(fuzz_dir, "fuzz_vhd"), "-runs=0"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for parent in ("parent-fixed", "parent-dynamic", "parent-diff"):
        child = os.path.join(parents, f"child-{parent}.vhd")
        run(strata, "create", "-f", "vhd", "-o", "type=differencing,block_size=4K",
            "-b", f"{parent}.vhd", child)
        # (no qemu-io write: QEMU's vpc driver does not know differencing
        # disks and would allocate a block over the parent locators)
        image_seeds("vhd", f"diff-over-{parent}", child, (RW, SMALL_CACHE))


# ---- NBD client streams (fuzz_handshake, fuzz_connection) -------------------

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META_CONTEXT=9, SET_META_CONTEXT=10)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5, WRITE_ZEROES=6, BLOCK_STATUS=7)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16


def option(name, payload=b""):
    code = OPT[name] if isinstance(name, str) else name
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload


def info_payload(export, *infos):
    e = export.encode()
    return struct.pack(">I", len(e)) + e + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_payload(export, *queries):
    e = export.encode()
    out = struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def request(cmd, offset=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, CMD[cmd], cookie, offset, length) + payload


def io_requests():
    data = bytes((i * 7) & 0xFF for i in range(4096))
    return b"".join([
        request("WRITE", 0, 4096, cookie=1, payload=data),
        request("READ", 0, 4096, cookie=2),
        request("WRITE_ZEROES", 8192, 4096, F_NO_HOLE, cookie=3),
        request("TRIM", 65536, 65536, cookie=4),
        request("READ", 0, 131072, cookie=5),
        request("BLOCK_STATUS", 0, 1 << 20, cookie=6),
        request("BLOCK_STATUS", 0, 1 << 20, F_REQ_ONE, cookie=7),
        request("WRITE", 4096, 512, F_FUA, cookie=8, payload=data[:512]),
        request("FLUSH", cookie=9),
        request("CACHE", 0, 4096, cookie=10),
        request("READ", (1 << 20) - 512, 1024, cookie=11),  # past the end: EINVAL
        request("DISC", cookie=12),
    ])


def protocol_seeds():
    fixed_nz = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    streams = {
        "go-structured": fixed_nz + option("STRUCTURED_REPLY")
        + option("SET_META_CONTEXT", meta_payload("", "base:allocation", "qemu:allocation-depth"))
        + option("GO", info_payload("", 1, 2, 3)) + io_requests(),
        "export-name-simple": struct.pack(">I", 1) + option("EXPORT_NAME", b"disk") + io_requests(),
        "list-info-abort": fixed_nz + option("LIST") + option("INFO", info_payload("ro", 3))
        + option("LIST_META_CONTEXT", meta_payload("disk")) + option(42, b"x" * 40)
        + option("INFO", info_payload("nope")) + option("ABORT"),
        "go-ro-df": fixed_nz + option("STRUCTURED_REPLY")
        + option("SET_META_CONTEXT", meta_payload("ro", "base:allocation"))
        + option("GO", info_payload("ro")) + request("READ", 0, 65536, F_DF, cookie=1)
        + request("WRITE", 0, 512, cookie=2, payload=bytes(512))
        + request("BLOCK_STATUS", 512, 4096, cookie=3),
        # A failed SET_META_CONTEXT must leave no context selected (doc/proto.md).
        "regress-set-meta-failure-clears": fixed_nz + option("STRUCTURED_REPLY")
        + option("SET_META_CONTEXT", meta_payload("", "base:allocation"))
        + option("SET_META_CONTEXT", meta_payload("no-such-export", "base:allocation"))
        + option("GO", info_payload("")) + request("BLOCK_STATUS", 0, 4096, cookie=1),
    }
    # An error reply must not echo a name longer than a string may be (4096 bytes).
    streams["regress-long-name-error-message"] = fixed_nz + option(
        "INFO", info_payload("n" * 5000))
    for target in ("handshake", "connection"):
        for name, data in streams.items():
            put(target, name, data)
    # Dirty bitmap contexts: fuzz_handshake's exports have bitmaps (the
    # connection target's raw exports have none).
    put("handshake", "meta-bitmaps", fixed_nz + option("STRUCTURED_REPLY")
        + option("LIST_META_CONTEXT", meta_payload("disk", "qemu:"))
        + option("LIST_META_CONTEXT", meta_payload("disk", "qemu:dirty-bitmap:", "base:"))
        + option("LIST_META_CONTEXT", meta_payload("backup"))
        + option("SET_META_CONTEXT", meta_payload("disk", "qemu:dirty-bitmap:a:b",
                                                  "qemu:dirty-bitmap:ro-only", "qemu:",
                                                  "base:allocation",
                                                  "qemu:dirty-bitmap:backup-0"))
        + option("GO", info_payload("disk")) + request("BLOCK_STATUS", 0, 4096, cookie=1))
    # A selection made for one export must not reach another, by GO or EXPORT_NAME.
    for name, enter in (("go", option("GO", info_payload("disk"))),
                        ("export-name", option("EXPORT_NAME", b"disk"))):
        put("handshake", f"meta-bitmaps-other-export-{name}", fixed_nz
            + option("STRUCTURED_REPLY")
            + option("SET_META_CONTEXT", meta_payload("backup", "qemu:dirty-bitmap:weekly",
                                                      "qemu:dirty-bitmap:backup-0"))
            + enter + request("BLOCK_STATUS", 0, 4096, cookie=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strata", help="strata binary (for `strata create` seeds)")
    ap.add_argument("--fuzz-dir", help="directory of the built fuzzers (for VHD parents)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        qcow2_seeds(tmp, a.strata)
        vhd_seeds(tmp, a.strata, a.fuzz_dir)
    protocol_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main())
