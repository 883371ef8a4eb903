"""The process-wide bound on payload held in memory
(limits.max_total_inflight_bytes): 16 clients that pipeline 32 MiB READs and
do not read the replies keep the server's resident memory under the bound
plus a fixed allowance; once they read, every reply arrives intact.

Each connection may hold one 32 MiB read (max_inflight_bytes 32M), so without
the process-wide bound the server holds 16 x 32 MiB = 512 MiB; with a bound
of 128 MiB it holds 4 reads and the other 12 readers wait. Every read that
holds memory has started its reply, so the test knows the server has taken
all it ever will when exactly 4 clients see reply bytes waiting (MSG_PEEK).
The peak (VmHWM) is then compared with the peak before the reads, which
already includes every connection's threads; the allowance covers ASan's
shadow memory (1/8 of what is touched) and allocator slack.
"""
import contextlib
import json
import os
import select
import struct
import threading
import time

from strata_test import Server, log, main, raw_handshake, recv_exact, workdir

MiB = 1 << 20
READ = 32 * MiB
BOUND = 128 * MiB
ALLOWANCE = 64 * MiB
CLIENTS = 16
READS_PER_CLIENT = 2
HOLDERS = BOUND // READ  # reads the bound lets the server hold at once


def vm_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def has_reply_waiting(s):
    return bool(select.select([s], [], [], 0)[0])


def read_request(cookie):
    return struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, 0, READ)


def read_replies(s, cookies, want, errors):
    try:
        buf = bytearray(READ)
        view = memoryview(buf)
        for _ in cookies:
            magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            assert (magic, err) == (0x67446698, 0), (hex(magic), err)
            assert cookie in cookies, cookie
            got = 0
            while got < READ:
                n = s.recv_into(view[got:])
                assert n, "connection closed in the middle of a reply"
                got += n
            assert buf == want, f"reply {cookie} differs"
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


def test_pipelined_reads_stay_under_the_total_bound():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        want = bytes(range(256)) * (READ // 256)
        with open(img, "wb") as f:
            f.write(want)
        sock = os.path.join(d, "s.sock")
        conf = os.path.join(d, "strata.json")
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": sock}],
                       "exports": [{"name": "test", "path": img, "format": "raw"}],
                       "limits": {"max_inflight_bytes": "32M",
                                  "max_total_inflight_bytes": "128M", "workers": 2}}, f)
        srv = Server(config=conf)
        srv.sock = sock
        clients = []
        with srv, contextlib.ExitStack() as closing:
            pid = srv.proc.pid
            for _ in range(CLIENTS):
                s = srv.connect_raw()
                raw_handshake(s, "test")
                s.settimeout(120)
                clients.append(closing.enter_context(s))
            baseline = vm_kib(pid, "VmHWM")
            for i, s in enumerate(clients):
                s.sendall(b"".join(read_request(i * READS_PER_CLIENT + k)
                                   for k in range(READS_PER_CLIENT)))
            deadline = time.time() + 120
            while True:
                waiting = sum(has_reply_waiting(s) for s in clients)
                grown = vm_kib(pid, "VmHWM") - baseline
                assert grown < BOUND + ALLOWANCE, (
                    f"server grew by {grown >> 20} MiB with {waiting} replies started")
                assert waiting <= HOLDERS, f"{waiting} reads in memory at once"
                if waiting == HOLDERS:
                    break
                assert time.time() < deadline, f"only {waiting} replies started"
                time.sleep(0.02)
            grown = vm_kib(pid, "VmHWM") - baseline
            log(f"baseline peak {baseline >> 20} MiB, grown by {grown >> 20} MiB "
                f"(bound {BOUND >> 20} MiB + allowance {ALLOWANCE >> 20} MiB), "
                f"{CLIENTS * READS_PER_CLIENT * READ >> 20} MiB requested")
            assert grown < BOUND + ALLOWANCE
            assert sum(has_reply_waiting(s) for s in clients) == HOLDERS

            # Now every client reads; the waiting readers get their turn.
            errors = []
            threads = [threading.Thread(target=read_replies, args=(
                s, set(range(i * READS_PER_CLIENT, (i + 1) * READS_PER_CLIENT)), want, errors))
                for i, s in enumerate(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            assert srv.alive()


if __name__ == "__main__":
    main([test_pipelined_reads_stay_under_the_total_bound])
