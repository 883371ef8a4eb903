"""Copy-free reads: large reads of raw, qcow2 (backing file, data file), VHD
dynamic and differencing images are sent from the page cache (sendfile) over
plain TCP and unix sockets, and read byte for byte what qemu-img convert (or
the file itself) says; strata_read_copy_free_bytes_total proves which path
ran: above zero there, zero over TLS and under --cache none, where replies
are copied. A client that resets the connection in the middle of a 32 MiB
copy-free reply leaves a server that serves the next client correctly. A
writable qcow2 image's data clusters are copied (they may move).

Not covered: a client that stops reading until the send timeout drops it
(the timeout is two minutes)."""
import os
import random
import socket
import struct

from strata_test import (STRATA, Server, file_bytes, main, nbd_handle, raw_handshake, recv_exact,
                         run, send_request, tls_psk, workdir)
from test_metrics import HTTP_LINE, http, metric, parse_metrics, wait_for
from test_tls import handle, wait_for_log

SIZE = 40 << 20
MIB = 1 << 20
NBD_CMD_READ = 0


def random_raw(d, name, size=SIZE, seed=1):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    return path


def converted(d, img, fmt):
    """The oracle: the image's guest bytes as qemu-img convert reads them."""
    out = os.path.join(d, os.path.basename(img) + ".oracle.raw")
    run(["qemu-img", "convert", "-f", fmt, "-O", "raw", img, out])
    return file_bytes(out)


def serve(img, fmt, *extra, **kw):
    return Server(img, "--format", fmt, "--http", "127.0.0.1:0", *extra, **kw)


def samples(srv):
    m = HTTP_LINE.search(srv.read_log())
    assert m, "no http endpoint line in the log"
    status, body, _ = http(int(m.group(1)), "/metrics")
    assert status == 200, (status, body)
    return parse_metrics(body)


def counter(srv, name):
    return metric(samples(srv), name, export="test")


def copy_free_bytes(srv):
    return counter(srv, "strata_read_copy_free_bytes_total")


# Large reads at aligned and unaligned offsets, across cluster and block
# boundaries, up to 32 MiB.
READS = [(0, 4 * MIB), (MIB - 4096, 3 * MIB + 777), (5 * MIB + 12345, 2 * MIB),
         (SIZE - 8 * MIB - 1, 8 * MIB + 1), (3 * MIB + 65536, 65536), (0, 32 * MIB)]


def read_and_compare(uri, want, reads=READS, structured=True):
    """Reads every range through libnbd (with structured replies, or simple
    ones) and compares it with `want`; returns the bytes read."""
    h = handle()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    total = 0
    for off, n in reads:
        got = h.pread(n, off)
        assert got == want[off:off + n], f"read {off}+{n} differs"
        total += n
    h.shutdown()
    return total


def assert_copy_free(srv, want, uris):
    before = copy_free_bytes(srv)
    for uri, structured in [(u, s) for u in uris for s in (True, False)]:
        read_and_compare(uri, want, structured=structured)
        after = wait_for(lambda b=before: (v := copy_free_bytes(srv)) > b and v, "copy-free bytes")
        before = after


def assert_copied(srv, want, uri):
    before_read = counter(srv, "strata_read_bytes_total")
    total = read_and_compare(uri, want)
    wait_for(lambda: counter(srv, "strata_read_bytes_total") >= before_read + total, "read bytes")
    assert copy_free_bytes(srv) == 0


def test_raw_over_tcp_and_unix_socket():
    with workdir() as d:
        img = random_raw(d, "disk.raw")
        with serve(img, "raw", tcp=True) as srv:
            assert_copy_free(srv, file_bytes(img), [srv.tcp_uri, srv.uri])


def test_raw_over_tls_is_copied():
    with workdir() as d:
        img = random_raw(d, "disk.raw")
        args, client = tls_psk(d)
        with serve(img, "raw", *args, tcp=True, tls_client=client) as srv:
            assert_copied(srv, file_bytes(img), srv.tcp_uri)


def test_cache_none_is_copied():
    with workdir() as d:
        img = random_raw(d, "disk.raw")
        with serve(img, "raw", "--cache", "none") as srv:
            assert_copied(srv, file_bytes(img), srv.uri)


def qemu_io(img, fmt, *commands):
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    run(cmd + [img])


def test_qcow2_with_backing_file():
    with workdir() as d:
        base = random_raw(d, "base.raw", seed=2)
        top = os.path.join(d, "top.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "-o",
             "cluster_size=65536", top])
        # Data of its own, zero clusters and unallocated ones over the backing file.
        qemu_io(top, "qcow2", "write -P 0x5a 1M 3M", "write -z 6M 2M", "write -P 0x33 7M 100k",
                "write -P 0x77 30M 5M")
        want = converted(d, top, "qcow2")
        with serve(top, "qcow2", "--read-only", tcp=True) as srv:
            assert_copy_free(srv, want, [srv.tcp_uri, srv.uri])


def test_writable_qcow2_data_clusters_are_copied():
    """A writable qcow2 may free a data cluster and reuse it elsewhere before
    a reply is sent: its data is read, not mapped."""
    with workdir() as d:
        src = random_raw(d, "src.raw", seed=6)
        img = os.path.join(d, "t.qcow2")
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, img])
        with serve(img, "qcow2") as srv:
            assert_copied(srv, file_bytes(src), srv.uri)


def test_qcow2_with_data_file():
    with workdir() as d:
        img = os.path.join(d, "t.qcow2")
        data = os.path.join(d, "t.data")
        run(["qemu-img", "create", "-f", "qcow2", "-o", f"data_file={data},cluster_size=65536",
             img, str(SIZE)])
        qemu_io(img, "qcow2", "write -P 0x11 0 9M", "write -P 0x22 12M 20M", "write -z 2M 1M")
        want = converted(d, img, "qcow2")
        with serve(img, "qcow2", "--read-only") as srv:
            assert_copy_free(srv, want, [srv.uri])


def test_vhd_dynamic():
    with workdir() as d:
        src = random_raw(d, "src.raw", seed=3)
        img = os.path.join(d, "t.vhd")
        run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
             "subformat=dynamic,force_size=on", src, img])
        want = converted(d, img, "vpc")
        assert want == file_bytes(src)
        with serve(img, "vhd") as srv:
            assert_copy_free(srv, want, [srv.uri])


def test_vhd_differencing():
    with workdir() as d:
        src = random_raw(d, "src.raw", seed=4)
        parent = os.path.join(d, "parent.vhd")
        run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o",
             "subformat=dynamic,force_size=on", src, parent])
        child = os.path.join(d, "child.vhd")
        run([STRATA, "create", "-f", "vhd", "-b", "parent.vhd", child], cwd=d)
        # What the child holds over its parent, written through strata, in a
        # model of the guest's bytes kept by the test.
        want = bytearray(file_bytes(src))
        rng = random.Random(5)
        with serve(child, "vhd") as srv:
            h = nbd_handle(srv.uri)
            for off, n in [(3 * MIB + 100, 70000), (10 * MIB, 4 * MIB), (2 * MIB - 512, 1024),
                           (21 * MIB + 7, MIB)]:
                data = rng.randbytes(n)
                h.pwrite(data, off)
                want[off:off + n] = data
            h.flush()
            h.shutdown()
            assert_copy_free(srv, bytes(want), [srv.uri])


def test_client_resetting_in_the_middle_of_a_copy_free_reply():
    with workdir() as d:
        img = random_raw(d, "disk.raw")
        want = file_bytes(img)
        with serve(img, "raw", tcp=True) as srv:
            for connect in (srv.connect_raw, lambda: socket.create_connection(("127.0.0.1",
                                                                                srv.port))):
                s = connect()
                s.settimeout(10)
                raw_handshake(s)
                send_request(s, NBD_CMD_READ, offset=0, length=32 * MIB, cookie=9)
                head = recv_exact(s, 16 + 4096)
                assert struct.unpack(">IIQ", head[:16])[1:] == (0, 9)
                assert head[16:] == want[:4096]
                # Reset, not a clean close: the server's sendfile fails.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            # Both connections end, their reply counted as not sent.
            closed = r"conn \d+: closed [^\n]* reads=1 [^\n]* bytes_read=0 "
            wait_for_log(srv, f"(?s){closed}.*{closed}")
            assert srv.alive()
            read_and_compare(srv.tcp_uri, want)
            assert copy_free_bytes(srv) > 0


if __name__ == "__main__":
    main([test_raw_over_tcp_and_unix_socket, test_raw_over_tls_is_copied,
          test_cache_none_is_copied, test_qcow2_with_backing_file,
          test_writable_qcow2_data_clusters_are_copied, test_qcow2_with_data_file,
          test_vhd_dynamic, test_vhd_differencing,
          test_client_resetting_in_the_middle_of_a_copy_free_reply])
