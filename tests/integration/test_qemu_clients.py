"""QEMU's NBD client: qemu-img convert and qemu-io against a raw export."""
import os
import random

from strata_test import Server, file_bytes, holes_supported, main, no_data_in, run, workdir


def make_random_image(path, size, seed=1):
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(16):  # some data, some holes
            off = rnd.randrange(0, size // 65536) * 65536
            f.seek(off)
            f.write(rnd.randbytes(65536 * rnd.randint(1, 4)))
        f.truncate(size)


def test_qemu_img_convert_equals_file():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        make_random_image(img, 32 << 20)
        with Server(img, "--format", "raw", "--read-only") as srv:
            out = os.path.join(d, "out.raw")
            run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out])
            assert file_bytes(out) == file_bytes(img)
            run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img, srv.uri])


def test_qemu_io_write_read_discard_zero():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.write(b"\x11" * (8 << 20))
        with Server(img, "--format", "raw") as srv:
            run(["qemu-io", "-f", "raw",
                 "-c", "write -P 0xab 1M 64k",
                 "-c", "write -P 0xcd 3000 5000",
                 "-c", "write -z 2M 128k",
                 "-c", "discard 4M 1M",
                 "-c", "read -P 0xab 1M 64k",
                 "-c", "read -P 0xcd 3000 5000",
                 "-c", "read -P 0 2M 128k",
                 "-c", "flush", srv.uri])
        data = file_bytes(img)
        assert data[(1 << 20):(1 << 20) + 65536] == b"\xab" * 65536
        assert data[3000:8000] == b"\xcd" * 5000
        assert data[2999:3000] == b"\x11" and data[8000:8001] == b"\x11"
        assert data[(2 << 20):(2 << 20) + (128 << 10)] == bytes(128 << 10)
        # Discard punched a hole: it reads as zeros and the file has no data there.
        assert data[(4 << 20):(5 << 20)] == bytes(1 << 20)
        if holes_supported(d):
            assert no_data_in(img, 4 << 20, 5 << 20), "the discarded range still has data"
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", img, img])


if __name__ == "__main__":
    main([test_qemu_img_convert_equals_file, test_qemu_io_write_read_discard_zero])
