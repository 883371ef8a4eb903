"""Persistent dirty bitmaps end to end, with QEMU as the oracle.

- The same writes (random and unaligned, write-zeroes, trims, across granules
  and clusters) through Strata and through `qemu-nbd --discard=unmap -B ...` on
  copies of one image give identical `nbdinfo --map=qemu:dirty-bitmap:NAME`
  output, live and after both stopped (then read back by qemu-nbd -B from
  both images), identical bitmaps in `qemu-img info` (none in use), a clean
  `qemu-img check`, equal guest data (`qemu-img compare`; on data_file_raw
  outside trimmed ranges, whose contents are unspecified). Variants: 64 KiB, 4 KiB, 512 B and 1 MiB granularity,
  several bitmaps and a disabled one, a metadata cache smaller than the
  bitmaps, `data_file`, `data_file_raw`, a backing chain (the backing file's
  bitmap is untouched).
- QEMU takes over: `qemu-img bitmap --merge` sees the bits Strata set.
- Crash: kill -9 (or SIGTERM) at random points of a write workload; on reopen
  every bitmap is IN_USE (qemu-img says so) or holds every granule written.
- Backup: a full copy, guest-like writes, then an incremental copy of only the
  dirty extents applied to the full copy equals the image.
- Bad input: a corrupt bitmap is skipped with its reason, never exported,
  marked IN_USE on the first write; the rest of the image serves.
- The image tool: `strata bitmap add|remove|clear|enable|disable|list`
  against qemu-img's view.
"""
import json
import os
import random
import shutil
import signal
import threading

import nbd

from strata_test import STRATA, QemuNbd, Server, log, main, run, workdir

SIZE = 64 << 20
MIB = 1 << 20


def qemu_img_bitmaps(img):
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", img]).stdout)
    data = info.get("format-specific", {}).get("data", {})
    return [(b["name"], b["granularity"], sorted(b["flags"])) for b in data.get("bitmaps", [])]


def dirty_map(uri, name):
    return run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri]).stdout


def workload(seed, count=120):
    """A fixed list of (kind, offset, length): writes, zeroes and trims,
    unaligned, some crossing granules and 64 KiB clusters."""
    rnd = random.Random(seed)
    ops = []
    for i in range(count):
        kind = rnd.choices(["write", "zero", "trim"], [6, 2, 2])[0]
        length = rnd.choice([1, 511, 4096, 5000, 65536, 70000, 300000, 2 * MIB])
        offset = rnd.randrange(0, SIZE - length)
        ops.append((kind, offset, length))
    return ops


def apply(uri, ops):
    h = nbd.NBD()
    h.connect_uri(uri)
    for i, (kind, offset, length) in enumerate(ops):
        if kind == "write":
            h.pwrite(bytes([i % 251 + 1]) * length, offset)
        elif kind == "zero":
            h.zero(length, offset)
        else:
            h.trim(length, offset)
    h.flush()
    h.shutdown()


def assert_same_data(d, ours, theirs, ops):
    """Guest data equal, except where the last request to touch a byte was a
    trim: its contents are unspecified then, and on a data_file_raw image
    the two servers differ (Strata punches a hole in the raw file, which
    reads as zeros; qemu-nbd keeps the old data)."""
    trimmed = bytearray(SIZE)
    for kind, offset, length in ops:
        trimmed[offset:offset + length] = (b"\x01" if kind == "trim" else b"\x00") * length
    raws = []
    for i, img in enumerate((ours, theirs)):
        raws.append(os.path.join(d, f"{i}.raw"))
        run(["qemu-img", "convert", "-O", "raw", img, raws[-1]])
    with open(raws[0], "rb") as a, open(raws[1], "rb") as b:
        x, y = a.read(), b.read()
    for pos in range(0, SIZE, MIB):
        if x[pos:pos + MIB] == y[pos:pos + MIB]:
            continue
        for i in range(pos, pos + MIB):
            assert x[i] == y[i] or trimmed[i], f"guest data differs at {i}"


def make_pair(d, create_opts, bitmaps, backing=False):
    """The same image twice: d/strata/a.qcow2 and d/qemu/a.qcow2 (with their
    data or backing files), bitmaps [(name, granularity, enabled)]."""
    src = os.path.join(d, "strata")
    os.makedirs(src)
    img = os.path.join(src, "a.qcow2")
    extra = []
    if backing:
        base = os.path.join(src, "base.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE)])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", base])
        run(["qemu-img", "bitmap", "--add", base, "base-bitmap"])
        extra = ["-b", "base.qcow2", "-F", "qcow2"]
    # Data files by absolute path: QEMU resolves a relative one against its
    # working directory, Strata against the image's.
    opts = create_opts.replace("data_file=a.data", "data_file=" + os.path.join(src, "a.data"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, "-o", opts, img, str(SIZE)], cwd=src)
    for name, gran, enabled in bitmaps:
        run(["qemu-img", "bitmap", "--add", "-g", str(gran), *([] if enabled else ["--disable"]),
             img, name])
    ref = os.path.join(d, "qemu")
    shutil.copytree(src, ref)
    copy = os.path.join(ref, "a.qcow2")
    if "data_file" in create_opts:
        run(["qemu-img", "amend", "-o", "data_file=" + os.path.join(ref, "a.data"), copy])
    return img, copy


def compare_with_qemu(create_opts, bitmaps, seed, backing=False, server_args=()):
    names = [b[0] for b in bitmaps]
    with workdir() as d:
        ours, theirs = make_pair(d, create_opts, bitmaps, backing)
        ops = workload(seed)
        live = {}
        with Server(ours, "--format", "qcow2", *server_args) as srv:
            apply(srv.uri, ops)
            for n in names:
                live[n] = dirty_map(srv.uri, n)
        bflags = [f for n in names for f in ("-B", n)]
        with QemuNbd(theirs, "qcow2", "--discard=unmap", *bflags) as ref:
            apply(ref.uri, ops)
            for n in names:
                assert live[n] == dirty_map(ref.uri, n), f"live map of {n} differs from qemu-nbd"
        assert any("dirty" in live[n] for n in names)
        # Both stopped: the bitmaps on disk, as QEMU reads them.
        assert qemu_img_bitmaps(ours) == qemu_img_bitmaps(theirs)
        for name, _, flags in qemu_img_bitmaps(ours):
            assert "in-use" not in flags, f"{name} left in use"
        p = run(["qemu-img", "check", ours], check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        if "data_file_raw" in create_opts:
            assert_same_data(d, ours, theirs, ops)
        else:
            run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", ours, theirs])
        for img in (ours, theirs):
            with QemuNbd(img, "qcow2", "-r", *bflags) as reader:
                for n in names:
                    assert dirty_map(reader.uri, n) == live[n], f"{img}: stored {n} differs"
        # QEMU takes over: a merge into a new bitmap carries Strata's bits.
        run(["qemu-img", "bitmap", "--add", "-g", str(bitmaps[0][1]), ours, "merged"])
        run(["qemu-img", "bitmap", "--merge", names[0], ours, "merged"])
        with QemuNbd(ours, "qcow2", "-r", "-B", "merged") as reader:
            assert dirty_map(reader.uri, "merged") == live[names[0]]
        if backing:
            base = os.path.join(os.path.dirname(ours), "base.qcow2")
            with QemuNbd(base, "qcow2", "-r", "-B", "base-bitmap") as reader:
                assert "dirty" not in dirty_map(reader.uri, "base-bitmap").replace("clean", "")
        log(f"{create_opts} {names}: maps identical to qemu-nbd's")


def test_granularities_and_a_disabled_bitmap():
    compare_with_qemu("cluster_size=64k",
                      [("b64k", 65536, True), ("b4k", 4096, True), ("off", 65536, False)], 1)


def test_small_clusters_many_bitmaps():
    # A metadata cache of 4 tables, far smaller than the bitmaps: they do not
    # live in it.
    compare_with_qemu("cluster_size=4k",
                      [("a", 512, True), ("b", 1 << 20, True), ("c", 65536, True)], 2,
                      server_args=("--cache-size", "16K"))


def test_data_file():
    compare_with_qemu("data_file=a.data", [("b0", 65536, True), ("b1", 4096, True)], 3)


def test_data_file_raw():
    compare_with_qemu("data_file=a.data,data_file_raw=on", [("b0", 65536, True)], 4)


def test_backing_chain():
    compare_with_qemu("cluster_size=64k", [("top", 65536, True)], 5, backing=True)


def assert_holds(img, name, writes):
    """Bitmap `name` of `img` (not in use) has every granule of `writes`."""
    ctx = f"qemu:dirty-bitmap:{name}"
    with QemuNbd(img, "qcow2", "-r", "-B", name) as reader:
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.connect_uri(reader.uri)
        for off, ln in writes:
            flags = []
            h.block_status(ln, off, lambda c, o, e, err: flags.extend(e[1::2]) if c == ctx else 0)
            assert flags and all(f & 1 for f in flags), f"{name}: write at {off}+{ln} missing"


def test_crash_leaves_bitmaps_exact_or_in_use():
    """Each round stops the server at a random point of a write workload,
    by SIGKILL or SIGTERM. After SIGTERM every bitmap is consistent and holds
    every acknowledged write; after SIGKILL each one is either reported in use
    (then cleared for the next round) or holds them all."""
    rnd = random.Random(7)
    with workdir() as d:
        img = os.path.join(d, "a.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
        run(["qemu-img", "bitmap", "--add", img, "b0"])
        run(["qemu-img", "bitmap", "--add", "-g", "4096", img, "b1"])
        acked = []  # (offset, length) of every acknowledged write since the last clear
        for it in range(10):
            crash = it % 2 == 0
            srv = Server(img, "--format", "qcow2").start()
            stop = srv.kill if crash else (lambda: srv.proc.send_signal(signal.SIGTERM))
            timer = threading.Timer(rnd.uniform(0.05, 0.6), stop)
            timer.start()
            try:
                h = nbd.NBD()
                h.connect_uri(srv.uri)
                while True:
                    off, ln = rnd.randrange(0, SIZE - 70000), rnd.choice([512, 4096, 70000])
                    h.pwrite(b"\x01" * ln, off)
                    acked.append((off, ln))
            except nbd.Error:
                pass
            finally:
                timer.cancel()
                if crash:
                    srv.kill()
                srv.stop(check=not crash)
            p = run(["qemu-img", "check", img], check=False)
            assert p.returncode in (0, 3) and "ERROR" not in p.stdout, p.stdout
            bitmaps = qemu_img_bitmaps(img)
            log(f"round {it} ({'SIGKILL' if crash else 'SIGTERM'}): {len(acked)} writes, {bitmaps}")
            for name, _, flags in bitmaps:
                if "in-use" in flags:
                    assert crash, f"{name} in use after a clean stop"
                    continue
                assert_holds(img, name, acked)
            if any("in-use" in f for _, _, f in bitmaps):
                for name, _, _ in bitmaps:
                    run([STRATA, "bitmap", "clear", img, name])
                acked.clear()


def dirty_extents(h, name, size):
    """[(offset, length)] of the dirty runs of bitmap `name`, asked in 4 GiB
    windows as backup tools do; every reply must make progress."""
    out, pos = [], 0
    ctx = f"qemu:dirty-bitmap:{name}"
    while pos < size:
        got = []

        def cb(metacontext, offset, entries, err):
            if metacontext == ctx:
                got.append((offset, entries))
            return 0

        h.block_status(min(size - pos, 0xfffffe00), pos, cb)
        assert got, "no reply for the bitmap context"
        offset, entries = got[0]
        assert offset == pos and entries, "no progress"
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if flags & 1:
                out.append((pos, length))
            pos += length
    return out


def test_incremental_backup():
    with workdir() as d:
        img = os.path.join(d, "disk.qcow2")
        data = os.path.join(d, "disk.raw")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
             f"data_file={data},data_file_raw=on", img, str(SIZE)])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 16M", img])
        run([STRATA, "bitmap", "add", img, "backup"])
        full = os.path.join(d, "full.raw")
        with Server(img, "--format", "qcow2") as srv:
            run(["nbdcopy", srv.uri, full])
            h = nbd.NBD()
            h.connect_uri(srv.uri)
            rnd = random.Random(11)
            for i in range(200):  # guest-like: small writes, some zeroing and trims
                off = rnd.randrange(0, SIZE - 65536)
                if i % 10 == 0:
                    h.zero(65536, off)
                elif i % 10 == 1:
                    h.trim(8192, off)
                else:
                    h.pwrite(os.urandom(rnd.choice([512, 4096, 12288])), off)
            h.flush()
            h2 = nbd.NBD()
            h2.add_meta_context("base:allocation")
            h2.add_meta_context("qemu:dirty-bitmap:backup")
            h2.connect_uri(srv.uri)
            extents = dirty_extents(h2, "backup", h2.get_size())
            copied = 0
            with open(full, "r+b") as f:
                for off, ln in extents:
                    f.seek(off)
                    f.write(h2.pread(ln, off))
                    copied += ln
            log(f"incremental copy: {len(extents)} extents, {copied} bytes of {SIZE}")
            assert 0 < copied < SIZE // 4
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", full, img])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", full, data])
        run([STRATA, "bitmap", "clear", img, "backup"])
        with Server(img, "--format", "qcow2", "--read-only") as srv:
            assert "dirty" not in dirty_map(srv.uri, "backup").replace("clean", "")


def test_corrupt_bitmap_is_skipped():
    with workdir() as d:
        img = os.path.join(d, "a.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
        run(["qemu-img", "bitmap", "--add", img, "good"])
        run(["qemu-img", "bitmap", "--add", img, "bad"])
        info = json.loads(run([STRATA, "info", "--output", "json", img]).stdout)
        assert [b["name"] for b in info["format-specific"]["bitmaps"]] == ["good", "bad"]
        # The second entry's granularity byte: the directory offset is in the
        # header extension, entry 1 starts after "good" (24 + 4 bytes, padded).
        with open(img, "r+b") as f:
            raw = f.read(65536)
            pos = raw.find(bytes.fromhex("23852875"), 104)  # the bitmaps extension
            dir_off = int.from_bytes(raw[pos + 8 + 16:pos + 8 + 24], "big")
            f.seek(dir_off + 32 + 17)
            f.write(bytes([40]))
        p = run([STRATA, "check", img], check=False)
        assert p.returncode == 2 and "bitmap 'bad'" in p.stdout, p.stdout
        with Server(img, "--format", "qcow2") as srv:
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.connect_uri(srv.uri)
            contexts = []
            h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
            h.opt_abort()
            assert "qemu:dirty-bitmap:good" in contexts
            assert "qemu:dirty-bitmap:bad" not in contexts
            apply(srv.uri, [("write", 0, 4096)])
            assert "granularity bits 40" in srv.read_log()
        with open(img, "r+b") as f:
            f.seek(dir_off + 32 + 17)
            f.write(bytes([16]))
        flags = {n: f for n, _, f in qemu_img_bitmaps(img)}
        assert "in-use" in flags["bad"] and "in-use" not in flags["good"], flags


def test_bitmap_verbs():
    """strata bitmap VERB against qemu-img's view, and its refusals."""
    with workdir() as d:
        img = os.path.join(d, "a.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
        run([STRATA, "bitmap", "add", img, "b0"])
        run([STRATA, "bitmap", "add", img, "fine", "-g", "4K", "--disable"])
        assert qemu_img_bitmaps(img) == [("b0", 65536, ["auto"]), ("fine", 4096, [])]
        listed = json.loads(run([STRATA, "bitmap", "list", img, "--output", "json"]).stdout)
        assert [(b["name"], b["granularity"], b["consistent"]) for b in listed] == [
            ("b0", 65536, True), ("fine", 4096, True)]
        assert "b0: granularity 65536, flags [auto]" in run([STRATA, "info", img]).stdout
        run([STRATA, "bitmap", "disable", img, "b0"])
        run([STRATA, "bitmap", "enable", img, "fine"])
        assert qemu_img_bitmaps(img) == [("b0", 65536, []), ("fine", 4096, ["auto"])]
        for bad, why in [(["add", img, "b0"], "exists already"),
                         (["add", img, "x", "-g", "3000"], "power of two"),
                         (["add", img, "x", "-g", "256"], "granularity"),
                         (["remove", img, "nope"], "no bitmap"),
                         (["clear", img], "NAME")]:
            p = run([STRATA, "bitmap", *bad], check=False)
            assert p.returncode == 1 and why in p.stderr, (bad, p.stderr)
        with Server(img, "--format", "qcow2"):
            p = run([STRATA, "bitmap", "remove", img, "b0"], check=False)
            assert p.returncode == 1, "edited an image that is being served"
        run([STRATA, "bitmap", "remove", img, "b0"])
        run([STRATA, "bitmap", "clear", img, "fine"])
        assert qemu_img_bitmaps(img) == [("fine", 4096, ["auto"])]
        raw = os.path.join(d, "a.raw")
        run(["qemu-img", "create", "-q", "-f", "raw", raw, "1M"])
        p = run([STRATA, "bitmap", "add", raw, "b0"], check=False)
        assert p.returncode == 1 and "only qcow2" in p.stderr, p.stderr
        p = run(["qemu-img", "check", img], check=False)
        assert p.returncode == 0, p.stdout


if __name__ == "__main__":
    main([test_granularities_and_a_disabled_bitmap, test_small_clusters_many_bitmaps,
          test_data_file, test_data_file_raw, test_backing_chain,
          test_crash_leaves_bitmaps_exact_or_in_use, test_incremental_backup,
          test_corrupt_bitmap_is_skipped, test_bitmap_verbs])
