"""Start-up, limits and shutdown: the default export, config errors, handshake
timeout, connection limit, graceful SIGTERM with requests in flight."""
import errno
import os
import signal
import socket
import time

import nbd

from strata_test import (STRATA, Server, holes_supported, main, no_data_in, recv_exact, run,
                         workdir)


def test_default_export_is_created_and_served():
    with workdir() as d:
        srv = Server(unix=False, tcp=True, cwd=d, export="default")
        srv.cmd = [STRATA, "serve", "--port", "0", "--bind", "127.0.0.1"]  # no image, no name
        with srv:
            uri = f"nbd://127.0.0.1:{srv.port}"
            assert f"serving {uri}/default" in srv.read_log()
            img = os.path.join(d, "data", "default.raw")
            assert os.path.getsize(img) == 1 << 30
            if holes_supported(d):
                assert no_data_in(img, 0, 1 << 30), "the default image is not sparse"
            out = run(["nbdinfo", "--size", f"{uri}/default"]).stdout
            assert int(out) == 1 << 30
            out = run(["nbdinfo", "--size", uri]).stdout  # "" = default
            assert int(out) == 1 << 30


def test_bad_config_names_the_key():
    with workdir() as d:
        conf = os.path.join(d, "c.json")
        with open(conf, "w") as f:
            f.write('{"exports": [{"name": "x", "path": "/nonexistent.raw", "format": "qcow3"}]}')
        p = run([STRATA, "serve", "--config", conf], check=False)
        assert p.returncode == 1
        assert "exports[0].format: 'qcow3' is not one of" in p.stderr, p.stderr
        with open(conf, "w") as f:
            f.write('{"exports": [{"name": "x", "path": "/nonexistent.raw"}]}')
        p = run([STRATA, "serve", "--config", conf], check=False)
        assert p.returncode == 1
        assert "export 'x'" in p.stderr and "/nonexistent.raw" in p.stderr, p.stderr
        p = run([STRATA, "serve", os.path.join(d, "missing.raw"), "--port", "0"], check=False)
        assert p.returncode == 1 and "missing.raw" in p.stderr, p.stderr


def test_handshake_timeout_drops_idle_clients():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        with Server(img, "--handshake-timeout-ms", "500") as srv:
            s = srv.connect_raw()
            recv_exact(s, 18)
            # We never close it and wait far longer than 500 ms: an EOF means
            # the server dropped us (a hang fails on our timeout instead).
            s.settimeout(60)
            assert s.recv(100) == b""
            assert int(run(["nbdinfo", "--size", srv.uri]).stdout) == 1 << 20


def test_connection_limit():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        with Server(img, "--max-connections", "2") as srv:
            a = nbd.NBD()
            a.connect_uri(srv.uri)
            b = nbd.NBD()
            b.connect_uri(srv.uri)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(srv.sock)
            c.settimeout(10)
            assert c.recv(100) == b""  # refused: closed without a greeting
            a.shutdown()
            # Room again once the server has seen the close: retried (the
            # close is asynchronous), never timed.
            for attempt in range(600):
                d2 = nbd.NBD()
                try:
                    d2.connect_uri(srv.uri)
                    break
                except nbd.Error:
                    del d2
                    time.sleep(0.05)
            else:
                raise AssertionError("a slot never came free after a client left")
            d2.shutdown()
            b.shutdown()
        assert "limit of 2 connections" in srv.log_text


def test_sigterm_finishes_in_flight_requests():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        srv = Server(img, "--format", "raw").start()
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        cookies = [h.aio_pwrite(bytes([i + 1]) * (1 << 20), i << 20) for i in range(32)]
        # Push every request onto the socket, give the server time to read
        # them, then stop it while the replies are still outstanding.
        while h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
            h.poll(100)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        # Every write gets its answer: done, or ESHUTDOWN if the server had
        # not started it (the sleep makes that rare; the test does not rely
        # on it).
        while h.aio_in_flight() > 0:
            h.poll(1000)
        written = []
        for i, cookie in enumerate(cookies):
            try:
                assert h.aio_command_completed(cookie)
                written.append(i)
            except nbd.Error as e:
                assert e.errno == errno.ESHUTDOWN, (i, e)
        assert srv.proc.wait(timeout=30) == 0
        srv.stop()
        with open(img, "rb") as f:
            for i in written:
                f.seek(i << 20)
                assert f.read(1 << 20) == bytes([i + 1]) * (1 << 20), i


if __name__ == "__main__":
    main([test_default_export_is_created_and_served, test_bad_config_names_the_key,
          test_handshake_timeout_drops_idle_clients, test_connection_limit,
          test_sigterm_finishes_in_flight_requests])
