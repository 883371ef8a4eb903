"""Crash safety: `strata serve` is killed with SIGKILL at random points of a
write workload (16 requests in flight, allocating writes over a backing file,
zero writes, trims, flushes), many times on the same image. Every time
`qemu-img check` must report no corruption (leaks are allowed) and every write
acknowledged before a completed FLUSH must read back (oracle: qemu-img
convert)."""
import os
import random
import threading
import time

import nbd

from strata_test import Server, main, run, workdir, file_bytes, log

SIZE = 64 << 20
SLOT = 16 << 10


def one_run(img, rnd, ever_used, durable, it):
    used = set()
    srv = Server(img, "--format", "qcow2").start()
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    killer = threading.Timer(rnd.uniform(0.2, 1.0), srv.kill)
    killer.start()
    inflight = {}     # cookie -> (kind, slot, off, data)
    acked = []        # (slot, off, data) acknowledged, not yet covered by a flush
    flushes = {}      # cookie -> list of writes acked before the flush was sent
    try:
        while True:
            while len(inflight) < 16:
                r = rnd.random()
                if r < 0.08:
                    c = h.aio_flush()
                    flushes[c] = list(acked)
                    inflight[c] = ("f", None, 0, None)
                    continue
                free = [s for s in rnd.sample(range(SIZE // SLOT), 8) if s not in used]
                if not free:
                    continue
                slot = free[0]
                used.add(slot)
                ever_used.add(slot)
                durable.pop(slot, None)  # the slot's contents are undefined until the next flush
                off = slot * SLOT + rnd.randrange(SLOT // 2)
                ln = 1 + rnd.randrange(SLOT - (off - slot * SLOT))
                if r < 0.75:
                    data = bytes([(it * 37 + slot) % 251 + 1]) * ln
                    c = h.aio_pwrite(data, off)
                    inflight[c] = ("w", slot, off, data)
                elif r < 0.9:
                    c = h.aio_zero(ln, off)
                    inflight[c] = ("w", slot, off, bytes(ln))
                else:
                    c = h.aio_trim(ln, off)
                    inflight[c] = ("t", slot, off, None)
            finished = [c for c in list(inflight) if h.aio_command_completed(c)]
            if not finished:
                h.poll(-1)
                continue
            for c in finished:
                kind, slot, off, data = inflight.pop(c)
                if kind == "w":
                    acked.append((slot, off, data))
                elif kind == "f":
                    for w in flushes.pop(c):
                        durable[w[0]] = (w[1], w[2])
    except nbd.Error:
        pass
    finally:
        killer.cancel()
        if srv.alive():
            srv.kill()
        srv.stop(check=False)


def test_sigkill_during_writes():
    rnd = random.Random(2024)
    with workdir() as d:
        base = os.path.join(d, "base.raw")
        with open(base, "wb") as f:
            f.write(bytes(range(256)) * (SIZE // 256))
        img = os.path.join(d, "top.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
             "-o", "cluster_size=64k", img, str(SIZE)])
        used, durable = set(), {}
        basedata = file_bytes(base)
        for it in range(12):
            one_run(img, rnd, used, durable, it)
            p = run(["qemu-img", "check", img], check=False)
            assert p.returncode in (0, 3), f"iteration {it}: qemu-img check\n{p.stdout}{p.stderr}"
            assert "ERROR" not in p.stdout + p.stderr, p.stdout
            out = os.path.join(d, "out.raw")
            run(["qemu-img", "convert", "-O", "raw", img, out])
            got = file_bytes(out)
            for slot, (off, data) in durable.items():
                assert got[off:off + len(data)] == data, f"iteration {it}: flushed write in slot {slot} lost"
            for slot in range(0, SIZE // SLOT, 7):  # untouched slots still show the backing file
                if slot not in used:
                    a = slot * SLOT
                    assert got[a:a + SLOT] == basedata[a:a + SLOT], f"slot {slot} changed"
            log(f"iteration {it}: {len(durable)} durable writes verified, check rc {p.returncode}")
        assert file_bytes(base) == basedata


if __name__ == "__main__":
    main([test_sigkill_during_writes])
