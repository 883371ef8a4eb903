"""Transmission threads on demand (server/io_threads.h, docs/ARCHITECTURE.md):
with --max-io-threads 4, eight connections that keep many FUA writes and
flushes in flight (each hands the read side over, so threads grow) never run
more than one thread each plus four, counted by the kernel (/proc/PID/task)
and by the strata_io_threads gauge, and every write reads back; idle
connections hold one thread each; threads started for a burst leave again."""
import os
import random
import threading

import nbd

from strata_test import Server, file_bytes, main, workdir
from test_metrics import HTTP_LINE, http, metric, parse_metrics, wait_for

SLOT = 256 << 10  # each connection writes its own slot
CLIENTS = 8
CAP = 4


def tasks(pid):
    """Threads of process `pid` now, as the kernel counts them."""
    return len(os.listdir(f"/proc/{pid}/task"))


class Strata:
    """Server(...) with the HTTP endpoint on a free loopback port."""

    def __init__(self, img, *args):
        self.server = Server(img, "--format", "raw", "--http", "127.0.0.1:0", *args)

    def __enter__(self):
        self.server.start()
        m = HTTP_LINE.search(self.server.read_log())
        assert m, "no http endpoint line in the log:\n" + self.server.read_log()
        self.port = int(m.group(1))
        # The endpoint's threads start with it; one scrape before counting.
        self.gauge()
        self.base = tasks(self.server.proc.pid)
        return self

    def __exit__(self, *exc):
        return self.server.__exit__(*exc)

    def gauge(self):
        status, body, _ = http(self.port, "/metrics")
        assert status == 200, (status, body)
        return metric(parse_metrics(body), "strata_io_threads")

    def handle(self):
        h = nbd.NBD()
        h.connect_uri(self.server.uri)
        return h


def flood(h, base, data, errors):
    """Many FUA writes and flushes in flight on one connection; `data` is
    what its slot holds at the end."""
    rnd = random.Random(base)
    try:
        pending = []
        for i in range(400):
            if i % 4 == 3:
                pending.append((h.aio_flush(), None))
            else:
                off = rnd.randrange(0, SLOT // 4096) * 4096
                chunk = rnd.randbytes(4096)
                # Only one write in flight per block: the last one is what stays.
                while any(p[1] == off for p in pending):
                    h.poll(-1)
                    pending = [p for p in pending if not h.aio_command_completed(p[0])]
                data[off:off + 4096] = chunk
                pending.append((h.aio_pwrite(chunk, base + off, flags=nbd.CMD_FLAG_FUA), off))
            while len(pending) >= 32:
                h.poll(-1)
                pending = [p for p in pending if not h.aio_command_completed(p[0])]
        while pending:
            h.poll(-1)
            pending = [p for p in pending if not h.aio_command_completed(p[0])]
    except Exception as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


def test_threads_stay_within_the_cap_under_flushes_and_fua_writes():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(CLIENTS * SLOT)
        expected = [bytearray(SLOT) for _ in range(CLIENTS)]
        with Strata(img, "--max-io-threads", str(CAP), "--workers", "16") as s:
            pid = s.server.proc.pid
            handles = [s.handle() for _ in range(CLIENTS)]
            # Every connection is in transmission (its first thread counted).
            wait_for(lambda: s.gauge() == CLIENTS, "one thread per connection")
            errors = []
            workers = [threading.Thread(target=flood, args=(h, i * SLOT, expected[i], errors))
                       for i, h in enumerate(handles)]
            for w in workers:
                w.start()
            most = most_counted = 0
            while any(w.is_alive() for w in workers):
                n = tasks(pid)
                assert s.base + CLIENTS <= n <= s.base + CLIENTS + CAP, (s.base, n)
                counted = s.gauge()
                assert CLIENTS <= counted <= CLIENTS + CAP, counted
                most, most_counted = max(most, n), max(most_counted, counted)
            for w in workers:
                w.join()
            assert not errors, errors
            print(f"threads: base {s.base}, most {most}; gauge at most {most_counted}")
            for i, h in enumerate(handles):
                assert h.pread(SLOT, i * SLOT) == bytes(expected[i]), f"slot {i}"
                h.shutdown()
            wait_for(lambda: s.gauge() == 0, "no transmission thread left")
        data = file_bytes(img)
        for i in range(CLIENTS):
            assert data[i * SLOT:(i + 1) * SLOT] == bytes(expected[i]), f"image slot {i}"


def test_idle_connections_hold_one_thread_each_and_a_burst_shrinks_back():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(CLIENTS * SLOT)
        with Strata(img, "--workers", "16") as s:
            pid = s.server.proc.pid
            handles = [s.handle() for _ in range(20)]
            wait_for(lambda: s.gauge() == 20, "20 connections in transmission")
            assert tasks(pid) <= s.base + 20, (s.base, tasks(pid))
            # A burst on one connection starts threads (default cap: 256)...
            errors = []
            flood(handles[0], 0, bytearray(SLOT), errors)
            assert not errors, errors
            # ...which leave once idle; each connection keeps one.
            wait_for(lambda: s.gauge() == 20, "the burst's threads to leave")
            wait_for(lambda: tasks(pid) <= s.base + 20, "the kernel to see them gone")
            for h in handles:
                h.shutdown()


if __name__ == "__main__":
    main([test_threads_stay_within_the_cap_under_flushes_and_fua_writes,
          test_idle_connections_hold_one_thread_each_and_a_burst_shrinks_back])
