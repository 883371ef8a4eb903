"""Many requests in one write: the server takes them from its read buffer in
batches and answers a batch with one gather write. Every reply must still come,
once, with the right cookie and data, whatever mix the batch holds (reads,
writes, refused requests, flushes), and a batch must never wait on its own
in-flight budget."""
import json
import os
import random
import struct
import threading

from strata_test import (Server, main, raw_handshake, recv_exact, workdir)

NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH = 0, 1, 3
EINVAL = 22
SIZE = 8 << 20


def request(cmd, offset, length, cookie, data=b""):
    return struct.pack(">IHHQQI", 0x25609513, 0, cmd, cookie, offset, length) + data


def read_replies(s, expect):
    """Reads len(expect) simple replies in any order. expect maps cookie to the
    number of data bytes a successful reply carries; returns cookie -> (error, data)."""
    got = {}
    while len(got) < len(expect):
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == 0x67446698, hex(magic)
        assert cookie in expect and cookie not in got, cookie
        got[cookie] = (error, recv_exact(s, expect[cookie]) if error == 0 else b"")
    return got


def make_image(d, seed=7):
    img = os.path.join(d, "disk.raw")
    content = random.Random(seed).randbytes(SIZE)
    with open(img, "wb") as f:
        f.write(content)
    return img, content


def test_mixed_pipeline_in_one_write():
    rng = random.Random(1)
    slot = 32768
    slots = list(range(SIZE // 2 // slot))
    rng.shuffle(slots)
    with workdir() as d:
        img, content = make_image(d)
        with Server(img, "--format", "raw", "--workers", "3") as srv:
            s = srv.connect_raw()
            raw_handshake(s, srv.export)
            s.settimeout(30)
            blob, expect, reads, writes, bad = b"", {}, {}, {}, []
            # Reads go to the first half; each write to its own slot of the
            # second: requests in flight together never overlap, as NBD leaves
            # their order undefined.
            for cookie in range(1, 201):
                kind = rng.choice(["read", "read", "write", "bad", "flush"])
                if kind == "read":
                    length = rng.choice([512, 4096, 65536, 100_000])
                    off = rng.randrange(0, SIZE // 2 - length)
                    blob += request(NBD_CMD_READ, off, length, cookie)
                    expect[cookie], reads[cookie] = length, (off, length)
                elif kind == "write":
                    length = rng.choice([512, 4096, 20_000])
                    off = SIZE // 2 + slots.pop() * slot + rng.randrange(0, slot - length)
                    data = rng.randbytes(length)
                    blob += request(NBD_CMD_WRITE, off, length, cookie, data)
                    expect[cookie], writes[cookie] = 0, (off, data)
                elif kind == "bad":
                    blob += request(NBD_CMD_READ, SIZE - 100, 4096, cookie)  # past the end
                    expect[cookie] = 0
                    bad.append(cookie)
                else:
                    blob += request(NBD_CMD_FLUSH, 0, 0, cookie)
                    expect[cookie] = 0
            assert reads and writes and bad
            # Send from a thread: like any NBD client, read replies while
            # still sending, or both sides end up waiting on full buffers.
            sender = threading.Thread(target=s.sendall, args=(blob,))
            sender.start()
            got = read_replies(s, expect)
            sender.join()
            for cookie, (off, length) in reads.items():
                assert got[cookie] == (0, content[off:off + length]), cookie
            for cookie in writes:
                assert got[cookie][0] == 0, cookie
            for cookie in bad:
                assert got[cookie][0] == EINVAL, cookie
            s.sendall(request(NBD_CMD_FLUSH, 0, 0, 999))
            assert read_replies(s, {999: 0})[999][0] == 0
            s.close()
        with open(img, "rb") as f:
            disk = f.read()
        for cookie, (off, data) in writes.items():
            assert disk[off:off + len(data)] == data, cookie


def test_batch_never_waits_on_its_own_budget():
    """With the smallest in-flight budget, a 32 MiB read followed in the same
    buffer by small reads: the small ones must wait for the next batch, not
    for bytes the batch itself holds."""
    with workdir() as d:
        img = os.path.join(d, "big.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
            f.seek(40 << 20)
            f.write(b"\x5a" * 4096)
        sock = os.path.join(d, "s.sock")
        conf = os.path.join(d, "strata.json")
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": sock}],
                       "exports": [{"name": "test", "path": img, "format": "raw"}],
                       "limits": {"max_inflight_bytes": "32M", "workers": 1}}, f)
        srv = Server(config=conf)
        srv.sock = sock
        with srv:
            s = srv.connect_raw()
            raw_handshake(s, "test")
            s.settimeout(30)
            blob = request(NBD_CMD_READ, 0, 32 << 20, 1)
            for i in range(2, 6):
                blob += request(NBD_CMD_READ, 40 << 20, 4096, i)
            s.sendall(blob)
            got = read_replies(s, {1: 32 << 20, 2: 4096, 3: 4096, 4: 4096, 5: 4096})
            assert got[1] == (0, bytes(32 << 20))
            for i in range(2, 6):
                assert got[i] == (0, b"\x5a" * 4096), i
            s.close()


if __name__ == "__main__":
    main([test_mixed_pipeline_in_one_write, test_batch_never_waits_on_its_own_budget])
