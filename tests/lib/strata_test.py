"""Shared helpers for integration tests: start a real `strata serve`, wait until it
listens, hand out URIs, stop it and check it exited cleanly.

Tests run under /usr/bin/python3 (python3-libnbd, python3-libvhdi are Debian
packages). STRATA points at the binary under test (set by ctest).
"""
import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STRATA = os.environ.get("STRATA") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build", "strata")


def log(*args):
    print(*args, flush=True)


def run(cmd, check=True, **kw):
    """Runs a command, returns CompletedProcess with text output."""
    log("+", " ".join(str(c) for c in cmd))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {cmd}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


SERVING_TCP = re.compile(r"^serving nbds?://(?:\[[^\]]*\]|[^:/]+):(\d+)/", re.M)


def tcp_port_from_output(text):
    """The TCP port a server started with --port 0 printed ("serving nbd://h:PORT/..."),
    or None if it has not printed it yet. Tests never pick a port themselves: a
    port found free here could be taken by anyone before the server binds it."""
    m = SERVING_TCP.search(text)
    return int(m.group(1)) if m else None


class Server:
    """A running `strata serve` process.

    Server(image, "--format", "raw", ...) listens on a unix socket in a temp dir
    (and with tcp=True on a TCP port the server picks: --port 0, read back from
    its output into .port). Use as a context manager; on exit it sends
    SIGTERM and asserts a clean exit (status 0, no sanitizer report).
    """

    def __init__(self, *args, export="test", tcp=False, unix=True, config=None,
                 expect_fail=False, env=None, bind="127.0.0.1", cwd=None, tls_client=None):
        # tls_client: (URI query, username or None) for a server started with
        # --tls require (see tls_psk); .uri and .tcp_uri are nbds then.
        self.tls_query, self.tls_user = tls_client or (None, None)
        self.tmp = tempfile.mkdtemp(prefix="strata-srv-")
        self.export = export
        self.sock = os.path.join(self.tmp, "nbd.sock") if unix else None
        self.tcp = tcp
        self.port = None  # known once the server prints it
        self.bind = bind
        self.logfile = os.path.join(self.tmp, "server.log")
        cmd = [STRATA, "serve"]
        if config is not None:
            cmd += ["--config", config]
        else:
            cmd += [str(a) for a in args]
            cmd += ["--export", export]
            if self.sock:
                cmd += ["--socket", self.sock]
            if tcp:
                cmd += ["--port", "0", "--bind", bind]
        self.cmd = cmd
        self.expect_fail = expect_fail
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.proc = None

    def start(self, timeout=20):
        log("+", " ".join(self.cmd))
        self.out = open(self.logfile, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.cwd)
        if self.expect_fail:
            return self
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early ({self.proc.returncode}):\n"
                                     + self.read_log())
            if self.ready():
                return self
            time.sleep(0.05)
        raise AssertionError("server did not start listening:\n" + self.read_log())

    def ready(self):
        if self.tcp and self.port is None:
            self.port = tcp_port_from_output(self.read_log())
            if self.port is None:
                return False
        try:
            if self.sock:
                if not os.path.exists(self.sock):
                    return False
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.sock)
            else:
                s = socket.create_connection((self.bind, self.port), timeout=1)
            s.settimeout(2)
            data = s.recv(8)
            s.close()
            return data == b"NBDMAGIC"
        except OSError:
            return False

    def read_log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    @property
    def uri(self):
        if self.sock:
            return self._uri("+unix", "", f"socket={self.sock}")
        return self._uri("", f"127.0.0.1:{self.port}", None)

    @property
    def tcp_uri(self):
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return self._uri("", f"{host}:{self.port}", None)

    def _uri(self, transport, host, query):
        scheme = ("nbds" if self.tls_query else "nbd") + transport
        user = f"{self.tls_user}@" if self.tls_user else ""
        q = "&".join(x for x in (query, self.tls_query) if x)
        return f"{scheme}://{user}{host}/{self.export}" + (f"?{q}" if q else "")

    def connect_raw(self):
        """A plain socket to the server, for hand-made protocol traffic."""
        if self.sock:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.sock)
        else:
            s = socket.create_connection((self.bind, self.port))
        s.settimeout(10)
        return s

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30, check=True):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not exit after signal:\n" + self.read_log())
        self.out.close()
        text = self.log_text = self.read_log()
        if check:
            assert "ERROR: AddressSanitizer" not in text, text
            assert "runtime error:" not in text, text
            assert "ThreadSanitizer" not in text, text
            if sig in (signal.SIGTERM, signal.SIGINT):
                assert self.proc.returncode == 0, (
                    f"server exit status {self.proc.returncode}\n{text}")
        return text

    def kill(self):
        """SIGKILL, for crash tests."""
        self.proc.kill()
        self.proc.wait()
        self.out.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.proc is not None and self.out and not self.out.closed:
                text = self.stop(check=exc_type is None)
                if exc_type is not None:
                    log("---- server log ----\n" + text[-5000:])
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


class QemuNbd:
    """qemu-nbd serving one image as export "test" on a unix socket: the
    reference server where a test compares answers. stop() ends it with
    SIGTERM (qemu-nbd then closes the image cleanly)."""

    def __init__(self, image, fmt="raw", *extra):
        self.tmp = tempfile.mkdtemp(prefix="qemu-nbd-")
        self.sock = os.path.join(self.tmp, "nbd.sock")
        self.export = "test"
        self.cmd = ["qemu-nbd", "-f", fmt, "-k", self.sock, "-x", self.export, "-t", "-e", "8",
                    *extra, image]

    def __enter__(self):
        log("+", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            assert self.proc.poll() is None, "qemu-nbd exited early"
            with contextlib.suppress(OSError):
                s = self.connect_raw()
                s.close()
                return self
            time.sleep(0.05)
        raise AssertionError("qemu-nbd did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, *exc):
        self.stop()
        return False

    @property
    def uri(self):
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def connect_raw(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.sock)
        s.settimeout(10)
        return s


def tls_psk(d, user="alice"):
    """A PSK file in d, in psktool's "username:hexkey" format: the server
    arguments that require TLS with it, and what a libnbd URI needs to use it
    (pass it as Server(..., tls_client=...)): the query and the username,
    which libnbd 1.14 takes from the URI's user part only."""
    path = os.path.join(d, "keys.psk")
    with open(path, "w") as f:
        f.write(f"{user}:{os.urandom(32).hex()}\n")
    return ["--tls", "require", "--tls-psk", path], (f"tls-psk-file={path}", user)


@contextlib.contextmanager
def workdir():
    d = tempfile.mkdtemp(prefix="strata-test-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def nbd_handle(uri):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def sparse_image(d, name="disk.raw", size=1 << 20):
    """A raw image of `size` bytes, all zeros (a hole), in directory d."""
    img = os.path.join(d, name)
    with open(img, "wb") as f:
        f.truncate(size)
    return img


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def holes_supported(directory):
    """True if a file in `directory` can get a hole punched (fallocate
    PUNCH_HOLE) that SEEK_DATA/SEEK_HOLE then report. Tests check that trimmed
    data was given back with no_data_in() only where this holds, and never by
    counting allocated blocks (file systems allocate at their own granularity)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    chunk = 1 << 20
    fd, path = tempfile.mkstemp(dir=directory, prefix=".holes-probe-")
    try:
        os.write(fd, b"x" * (3 * chunk))
        os.fsync(fd)
        if libc.fallocate(fd, 3, chunk, chunk) != 0:  # PUNCH_HOLE | KEEP_SIZE
            return False
        return (os.lseek(fd, chunk, os.SEEK_HOLE) == chunk and
                os.lseek(fd, chunk, os.SEEK_DATA) == 2 * chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
        os.remove(path)


def no_data_in(path, start, end):
    """True if SEEK_DATA finds no data in [start, end) of the file (the range
    rounded inward to the file system's block size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        bs = os.fstat(fd).st_blksize
        a, b = -(-start // bs) * bs, end // bs * bs
        if a >= b:
            return True
        try:
            return os.lseek(fd, a, os.SEEK_DATA) >= b
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data from a to the end of the file
                return True
            raise
    finally:
        os.close(fd)


def main(tests):
    """Runs test functions in order; prints 'N passed, M failed'; exits non-zero on failure."""
    passed = failed = 0
    only = sys.argv[1:] or None
    for t in tests:
        if only and t.__name__ not in only:
            continue
        log(f"=== {t.__name__}")
        t0 = time.time()
        try:
            t()
            passed += 1
            log(f"--- PASS {t.__name__} ({time.time() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - report every failure
            failed += 1
            import traceback
            traceback.print_exc()
            log(f"--- FAIL {t.__name__}: {e}")
    log(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


# ---- Hand-made protocol traffic (for bad-input tests) -------------------------
import struct

NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def send_option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)


def read_option_reply(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == 0x3e889045565a9, hex(magic)
    return opt, rtype, recv_exact(s, length)


def raw_handshake(s, export="test"):
    """Fixed-newstyle handshake with NBD_OPT_GO; returns (size, flags). Simple replies."""
    greeting = recv_exact(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    s.sendall(struct.pack(">I", 1 | 2))
    name = export.encode()
    send_option(s, NBD_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    size = flags = None
    while True:
        opt, rtype, data = read_option_reply(s)
        if rtype == 3:
            if struct.unpack(">H", data[:2])[0] == 0:
                size, flags = struct.unpack(">QH", data[2:12])
        elif rtype == 1:
            return size, flags
        else:
            raise AssertionError(f"unexpected option reply {rtype:#x} {data!r}")


def send_request(s, cmd, offset=0, length=0, cookie=1, flags=0, data=b"",
                 magic=NBD_REQUEST_MAGIC):
    s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data)


def read_simple_reply(s, data_len=0):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == NBD_SIMPLE_REPLY_MAGIC, hex(magic)
    data = recv_exact(s, data_len) if (data_len and error == 0) else b""
    return error, cookie, data


def assert_closed(s, timeout=10):
    """The server closed the connection (EOF or reset) within timeout."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return
    except (ConnectionResetError, BrokenPipeError):
        return
