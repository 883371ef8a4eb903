"""python3-libnbd: 64 mixed async reads and writes in flight, every byte verified;
two connections see each other's flushed writes. Each runs in plain text and
over TLS (PSK): one thread receives while another sends on one TLS session."""
import os
import random

import nbd

from strata_test import Server, file_bytes, main, tls_psk, workdir

SIZE = 32 << 20


def server_args(d, tls):
    """The extra server arguments and the client's TLS settings."""
    return tls_psk(d) if tls else ([], None)


def test_64_async_requests_in_flight(tls=False):
    rnd = random.Random(42)
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        initial = rnd.randbytes(SIZE)
        with open(img, "wb") as f:
            f.write(initial)
        expected = bytearray(initial)
        args, client = server_args(d, tls)
        with Server(img, "--format", "raw", *args, tls_client=client) as srv:
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)
            h.connect_uri(srv.uri)
            # Writes go to disjoint 64K slots so in-flight order cannot matter;
            # reads target slots no write touches, and are checked against `expected`.
            slots = list(range(SIZE // 65536))
            rnd.shuffle(slots)
            write_slots, read_slots = slots[:256], slots[256:]
            pending = []
            max_inflight = 0
            ops = 0
            while ops < 1000 or pending:
                while ops < 1000 and len(pending) < 64:
                    if rnd.random() < 0.5:
                        slot = write_slots[ops % len(write_slots)]
                        off = slot * 65536 + rnd.randrange(0, 4096)
                        length = rnd.randrange(1, 65536 - 4096)
                        data = rnd.randbytes(length)
                        # Later writes to the same slot only after earlier ones finished.
                        if any(p[0] == "w" and p[1] // 65536 == slot for p in pending):
                            ops += 1
                            continue
                        expected[off:off + length] = data
                        cookie = h.aio_pwrite(data, off)
                        pending.append(("w", off, length, None, cookie))
                    else:
                        slot = rnd.choice(read_slots)
                        off = slot * 65536 + rnd.randrange(0, 1024)
                        length = rnd.randrange(1, 60000)
                        buf = nbd.Buffer(length)
                        cookie = h.aio_pread(buf, off)
                        pending.append(("r", off, length, buf, cookie))
                    ops += 1
                max_inflight = max(max_inflight, h.aio_in_flight())
                h.poll(-1)
                still = []
                for p in pending:
                    if h.aio_command_completed(p[4]):
                        if p[0] == "r":
                            got = p[3].to_bytearray()
                            assert got == expected[p[1]:p[1] + p[2]], f"read at {p[1]} differs"
                    else:
                        still.append(p)
                pending = still
            assert max_inflight >= 60, max_inflight
            h.flush()
            # Every byte through the server equals the expected buffer.
            for off in range(0, SIZE, 1 << 20):
                assert h.pread(1 << 20, off) == expected[off:off + (1 << 20)], off
            h.shutdown()
        assert file_bytes(img) == expected


def test_two_connections_see_flushed_writes(tls=False):
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(4 << 20)
        args, client = server_args(d, tls)
        with Server(img, "--format", "raw", *args, tls_client=client) as srv:
            a = nbd.NBD()
            a.set_uri_allow_local_file(True)
            a.connect_uri(srv.uri)
            b = nbd.NBD()
            b.set_uri_allow_local_file(True)
            b.connect_uri(srv.uri)
            assert a.can_multi_conn()
            a.pwrite(b"A" * 4096, 8192)
            a.flush()
            assert b.pread(4096, 8192) == b"A" * 4096
            b.pwrite(b"B" * 512, 100000, nbd.CMD_FLAG_FUA)
            assert a.pread(512, 100000) == b"B" * 512
            if tls:
                assert a.get_tls_negotiated() and b.get_tls_negotiated()
            a.shutdown()
            b.shutdown()


def test_64_async_requests_in_flight_over_tls():
    test_64_async_requests_in_flight(tls=True)


def test_two_connections_see_flushed_writes_over_tls():
    test_two_connections_see_flushed_writes(tls=True)


if __name__ == "__main__":
    main([test_64_async_requests_in_flight, test_two_connections_see_flushed_writes,
          test_64_async_requests_in_flight_over_tls,
          test_two_connections_see_flushed_writes_over_tls])
