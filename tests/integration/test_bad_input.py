"""Malformed NBD traffic over a raw socket: each case gets the spec's answer (an
error reply or a clean close) and the server keeps serving the next client."""
import os
import struct

from strata_test import (Server, assert_closed, main, raw_handshake, read_option_reply,
                         read_simple_reply, recv_exact, send_option, send_request, workdir)

EINVAL, EPERM, ENOSPC = 22, 1, 28
SIZE = 1 << 20


def serve(d, *extra):
    img = os.path.join(d, "disk.raw")
    with open(img, "wb") as f:
        f.write(b"\x42" * SIZE)
    return Server(img, "--format", "raw", *extra)


def still_serving(srv):
    s = srv.connect_raw()
    size, _ = raw_handshake(s, srv.export)
    assert size == SIZE
    send_request(s, 0, 0, 512, cookie=77)
    err, cookie, data = read_simple_reply(s, 512)
    assert (err, cookie, data) == (0, 77, b"\x42" * 512)
    s.close()
    assert srv.alive()


def test_wrong_client_flags_and_option_magic():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 1 | 0x80))  # an unknown client flag
        assert_closed(s)
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 0))  # plain newstyle: only EXPORT_NAME is possible
        send_option(s, 7, struct.pack(">I", 4) + b"test" + struct.pack(">H", 0))
        assert_closed(s)
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 1))
        s.sendall(struct.pack(">QII", 0x1122334455667788, 7, 0))  # wrong option magic
        assert_closed(s)
        still_serving(srv)


def test_unknown_option_gets_unsup_and_handshake_continues():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3))
        send_option(s, 0x4242, b"junk")
        opt, rtype, data = read_option_reply(s)
        assert opt == 0x4242 and rtype == 0x80000001, (opt, hex(rtype))
        send_option(s, 5)  # STARTTLS: not offered
        assert read_option_reply(s)[1] == 0x80000001
        # The handshake goes on: GO works afterwards.
        name = srv.export.encode()
        send_option(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            _, rtype, _ = read_option_reply(s)
            if rtype == 1:
                break
        send_request(s, 0, 0, 16, cookie=5)
        assert read_simple_reply(s, 16)[0] == 0
        s.close()
        still_serving(srv)


def test_oversized_option_closes():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 0x7fffffff))
        assert_closed(s)
        still_serving(srv)


def test_truncated_header_then_disconnect():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        raw_handshake(s, srv.export)
        s.sendall(struct.pack(">IHH", 0x25609513, 0, 0))  # 8 of 28 bytes
        s.close()
        still_serving(srv)


def test_wrong_request_magic_closes():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        raw_handshake(s, srv.export)
        send_request(s, 0, 0, 512, magic=0xdeadbeef)
        assert_closed(s)
        still_serving(srv)


def test_unknown_command_and_flags_get_einval():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        raw_handshake(s, srv.export)
        send_request(s, 99, 0, 0, cookie=1)
        assert read_simple_reply(s) == (EINVAL, 1, b"")
        send_request(s, 0, 0, 512, cookie=2, flags=0x8000)  # unknown flag
        assert read_simple_reply(s) == (EINVAL, 2, b"")
        send_request(s, 7, 0, 512, cookie=3)  # block status without a context
        assert read_simple_reply(s) == (EINVAL, 3, b"")
        send_request(s, 0, 0, 512, cookie=4)  # connection still good
        assert read_simple_reply(s, 512)[0] == 0
        s.close()
        still_serving(srv)


def test_oversize_and_out_of_range_requests():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        raw_handshake(s, srv.export)
        send_request(s, 0, 0, (32 << 20) + 1, cookie=1)  # read above the maximum
        assert read_simple_reply(s)[0:2] == (EINVAL, 1)
        send_request(s, 0, SIZE - 100, 512, cookie=2)  # read past the end
        assert read_simple_reply(s)[0:2] == (EINVAL, 2)
        send_request(s, 0, (1 << 64) - 512, 1024, cookie=3)  # offset overflow
        assert read_simple_reply(s)[0:2] == (EINVAL, 3)
        send_request(s, 1, SIZE - 100, 512, cookie=4, data=b"x" * 512)  # write past the end
        assert read_simple_reply(s)[0:2] == (ENOSPC, 4)
        send_request(s, 6, SIZE, 512, cookie=5)  # write zeroes past the end
        assert read_simple_reply(s)[0:2] == (ENOSPC, 5)
        big = (32 << 20) + 4096  # oversize write: payload is skipped, EINVAL
        send_request(s, 1, 0, big, cookie=6, data=b"\0" * big)
        assert read_simple_reply(s)[0:2] == (EINVAL, 6)
        send_request(s, 0, 0, 512, cookie=7)
        err, cookie, data = read_simple_reply(s, 512)
        assert (err, cookie, data) == (0, 7, b"\x42" * 512)  # nothing was written
        s.close()
        still_serving(srv)


def test_write_to_read_only_export_gets_eperm():
    with workdir() as d, serve(d, "--read-only") as srv:
        s = srv.connect_raw()
        _, flags = raw_handshake(s, srv.export)
        assert flags & 2  # READ_ONLY
        send_request(s, 1, 0, 512, cookie=1, data=b"y" * 512)
        assert read_simple_reply(s)[0:2] == (EPERM, 1)
        send_request(s, 4, 0, 512, cookie=2)  # trim
        assert read_simple_reply(s)[0:2] == (EPERM, 2)
        send_request(s, 6, 0, 512, cookie=3)  # write zeroes
        assert read_simple_reply(s)[0:2] == (EPERM, 3)
        s.close()
        still_serving(srv)
        with open(os.path.join(d, "disk.raw"), "rb") as f:
            assert f.read() == b"\x42" * SIZE


def test_disconnect_in_the_middle_of_a_write_payload():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        raw_handshake(s, srv.export)
        send_request(s, 1, 0, 65536, cookie=1, data=b"z" * 1000)  # 1000 of 65536 bytes
        s.close()
        still_serving(srv)
        with open(os.path.join(d, "disk.raw"), "rb") as f:
            assert f.read(65536) == b"\x42" * 65536  # the partial write was not applied


def test_garbage_instead_of_handshake():
    with workdir() as d, serve(d) as srv:
        s = srv.connect_raw()
        recv_exact(s, 18)
        s.sendall(os.urandom(4096))
        assert_closed(s)
        still_serving(srv)


if __name__ == "__main__":
    main([test_wrong_client_flags_and_option_magic,
          test_unknown_option_gets_unsup_and_handshake_continues,
          test_oversized_option_closes, test_truncated_header_then_disconnect,
          test_wrong_request_magic_closes, test_unknown_command_and_flags_get_einval,
          test_oversize_and_out_of_range_requests, test_write_to_read_only_export_gets_eperm,
          test_disconnect_in_the_middle_of_a_write_payload, test_garbage_instead_of_handshake])
