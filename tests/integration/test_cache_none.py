"""Cache mode none (--cache none, export key "cache": "none"): clients read and
write through O_DIRECT and get the same bytes, unaligned requests included;
serving a whole image leaves none of it in the host page cache (fincore),
where writeback does; a qcow2 written this way stays clean for qemu-img check
and holds what was written, read back by qemu-io from the file."""
import json
import os
import random
import subprocess

from strata_test import STRATA, Server, file_bytes, main, nbd_handle, run, workdir

SIZE = 8 << 20


def patterned_image(d, name="disk.raw", size=SIZE):
    """A raw image of a pattern, durable and dropped from the page cache."""
    img = os.path.join(d, name)
    data = bytes((i * 7 + i // 4096) & 0xFF for i in range(size))
    with open(img, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    drop_cache(img)
    return img, bytearray(data)


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path):
    """Bytes of the file in the page cache, as fincore counts them."""
    out = run(["fincore", "--bytes", "--noheadings", "--output", "RES", path]).stdout
    return int(out.strip())


def test_unaligned_reads_and_writes_give_the_same_bytes():
    with workdir() as d:
        img, shadow = patterned_image(d)
        rng = random.Random(11)
        with Server(img, "--format", "raw", "--cache", "none") as srv:
            h = nbd_handle(srv.uri)
            for i in range(300):
                length = rng.randrange(1, 100000)
                offset = rng.randrange(0, SIZE - length)
                if i % 3 == 0:
                    data = rng.randbytes(length)
                    h.pwrite(data, offset)
                    shadow[offset:offset + length] = data
                else:
                    assert h.pread(length, offset) == shadow[offset:offset + length], (offset,
                                                                                       length)
            h.zero(1000, 12345)  # count, offset
            shadow[12345:13345] = bytes(1000)
            h.flush()
            assert h.pread(SIZE, 0) == shadow
            h.shutdown()
        assert file_bytes(img) == shadow
        assert os.path.getsize(img) == SIZE


def test_many_requests_in_flight_give_the_same_bytes():
    """Reads and writes in flight together run as batches (submitted to the
    kernel at once): each gets its own bytes, aligned or not, FUA or not."""
    import nbd
    with workdir() as d:
        img, shadow = patterned_image(d)
        rng = random.Random(5)
        slot = 65536
        with Server(img, "--format", "raw", "--cache", "none") as srv:
            h = nbd_handle(srv.uri)
            for _ in range(10):
                reads, cookies = [], []
                # Distinct slots: requests in flight together never overlap.
                for s in rng.sample(range(SIZE // slot), 48):
                    aligned = rng.random() < 0.75
                    length = 4096 * rng.randrange(1, 9) if aligned else rng.randrange(1, 20000)
                    offset = s * slot + (0 if aligned else rng.randrange(0, slot - length))
                    if rng.random() < 0.5:
                        data = rng.randbytes(length)
                        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
                        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                                    offset, flags=flags))
                        shadow[offset:offset + length] = data
                    else:
                        buf = nbd.Buffer(length)
                        cookies.append(h.aio_pread(buf, offset))
                        reads.append((buf, offset, length))
                while h.aio_in_flight() > 0:
                    h.poll(-1)
                for c in cookies:
                    assert h.aio_command_completed(c)  # raises on an error reply
                for buf, offset, length in reads:
                    assert buf.to_bytearray() == shadow[offset:offset + length], (offset, length)
            h.flush()
            h.shutdown()
        assert file_bytes(img) == shadow


def whole_image_copy_cache_growth(cache):
    with workdir() as d:
        img, _ = patterned_image(d)
        assert cached_bytes(img) == 0
        with Server(img, "--format", "raw", "--cache", cache) as srv:
            run(["nbdcopy", srv.uri, "null:"])
            h = nbd_handle(srv.uri)
            h.pwrite(b"x" * 5000, 777)
            h.flush()
            h.shutdown()
        return cached_bytes(img)


def test_a_whole_image_copy_leaves_nothing_in_the_page_cache():
    assert whole_image_copy_cache_growth("none") == 0
    # Writeback fills it: the check above can fail.
    assert whole_image_copy_cache_growth("writeback") >= SIZE // 2


def test_qcow2_written_with_cache_none_is_clean_and_holds_the_data():
    with workdir() as d:
        img = os.path.join(d, "disk.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(SIZE)])
        assert os.path.getsize(img) % 512 != 0  # as qemu-img makes it: a partial last block
        writes = [(0, 1, 0x11), (511, 3, 0x22), (65535, 70000, 0x33), (1 << 20, 4096, 0x44),
                  (5 * (1 << 20) + 7, 123457, 0x55)]
        with Server(img, "--format", "qcow2", "--cache", "none") as srv:
            h = nbd_handle(srv.uri)
            for offset, length, byte in writes:
                h.pwrite(bytes([byte]) * length, offset)
            h.flush()
            for offset, length, byte in writes:
                assert h.pread(length, offset) == bytes([byte]) * length
            h.shutdown()
        run(["qemu-img", "check", "-q", img])
        for offset, length, byte in writes:
            run(["qemu-io", "-f", "qcow2", "-c", f"read -P {byte} {offset} {length}", img])
        run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 2 509", img])


def test_cache_key_in_a_config_and_its_errors():
    with workdir() as d:
        img, shadow = patterned_image(d)
        conf = os.path.join(d, "c.json")
        srv = Server(config=conf)
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": srv.sock}],
                       "exports": [{"name": "test", "path": img, "cache": "none"}]}, f)
        with srv:
            h = nbd_handle(srv.uri)
            assert h.pread(4096, 4096) == shadow[4096:8192]
            h.shutdown()
        assert cached_bytes(img) == 0
        p = subprocess.run([STRATA, "serve", "--config", conf, "--cache", "none"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "--cache is for IMAGE" in p.stdout + p.stderr, p
        with open(conf, "w") as f:
            json.dump({"exports": [{"name": "test", "path": img, "cache": "off"}]}, f)
        p = subprocess.run([STRATA, "serve", "--config", conf], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0, p
        assert "exports[0].cache: 'off' is not one of writeback, none" in p.stdout + p.stderr, p


if __name__ == "__main__":
    main([test_unaligned_reads_and_writes_give_the_same_bytes,
          test_many_requests_in_flight_give_the_same_bytes,
          test_a_whole_image_copy_leaves_nothing_in_the_page_cache,
          test_qcow2_written_with_cache_none_is_clean_and_holds_the_data,
          test_cache_key_in_a_config_and_its_errors])
