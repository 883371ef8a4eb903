"""Crash safety: SIGKILL the server at random points of an allocating write
workload, many times over the same image. After every kill the file ends in a
valid footer, the image opens (strata check finds no corruption; leaked space
is allowed), and every write acknowledged before a completed FLUSH reads back,
checked offline by an independent reader (vhdread.py; qemu-img as well for
dynamic disks). In a differencing disk, nothing the parent holds may turn into
zeros.
"""
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from strata_test import STRATA, Server, file_bytes, log, main, nbd_handle, run, workdir  # noqa: E402
import vhdread  # noqa: E402

MiB = 1024 * 1024
SLOT = 16 * 1024
PER_ITERATION = 256
ITERATIONS = 12


def crash_loop(image, model, reader, seed, qemu_check):
    rng = random.Random(seed)
    slots = list(range(len(model) // SLOT))
    rng.shuffle(slots)
    for it in range(ITERATIONS):
        durable = []   # (off, data) acknowledged before a completed flush
        pending = []   # acknowledged, not yet covered by a flush
        maybe = []     # issued, outcome unknown
        s = Server(image, "--format", "vhd")
        s.start()
        h = nbd_handle(s.uri)
        # The kill lands a few milliseconds after a random write of the run.
        killer = threading.Timer(rng.uniform(0, 0.004), s.kill)
        trigger = rng.randrange(10, PER_ITERATION - 60)
        budget = PER_ITERATION
        try:
            while budget > 0:
                budget -= 1
                if budget == trigger:
                    killer.start()
                slot = slots.pop()
                n = rng.randrange(1, SLOT)
                off = slot * SLOT + rng.randrange(0, SLOT - n + 1)
                data = rng.randbytes(n)
                maybe.append((off, data))
                h.pwrite(data, off)
                maybe.pop()
                pending.append((off, data))
                if rng.random() < 0.2:
                    h.flush()
                    durable += pending
                    pending = []
        except Exception as e:  # noqa: BLE001 - the server was killed under us
            log(f"iteration {it}: killed after {len(durable)} durable writes ({e})")
        if not killer.is_alive() and not killer.finished.is_set():
            killer.start()
        killer.join()
        if s.alive():
            s.kill()
        if budget == 0:
            log(f"iteration {it}: the kill came after the last write")
        # The file always ends in a valid footer and the image opens.
        data = file_bytes(image)
        vhdread.parse_footer(data[-512:])
        p = run([STRATA, "check", image], check=False)
        assert p.returncode in (0, 3), p.stdout + p.stderr
        got = reader().read_all()
        for off, d in durable:
            model[off:off + len(d)] = d
        # Writes acknowledged without a flush, or in flight, may or may not have
        # landed: take what is there, and check everything else exactly.
        for off, d in pending + maybe:
            model[off:off + len(d)] = got[off:off + len(d)]
        assert got == bytes(model), f"iteration {it}: content differs"
        if qemu_check:
            raw = image + ".raw"
            run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", image, raw])
            assert file_bytes(raw) == got
            os.remove(raw)


def test_crash_dynamic():
    with workdir() as d:
        img = os.path.join(d, "dyn.vhd")
        run([STRATA, "create", "-f", "vhd", "-o", "block_size=64K", img, "48M"])
        size = vhdread.Vhd(img).size
        crash_loop(img, bytearray(size), lambda: vhdread.Vhd(img), seed=5, qemu_check=True)


def test_crash_differencing():
    with workdir() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        run([STRATA, "create", "-f", "vhd", base, "48M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 0x3c 0 48M", base])
        before = file_bytes(base)
        run([STRATA, "create", "-f", "vhd", "-o", "block_size=128K", "-b", "base.vhd", child])
        model = bytearray(vhdread.Vhd(base).read_all())
        crash_loop(child, model, lambda: vhdread.Vhd(child, parent=vhdread.Vhd(base)), seed=6,
                   qemu_check=False)
        assert file_bytes(base) == before, "the parent was written"


if __name__ == "__main__":
    main([test_crash_dynamic, test_crash_differencing])
