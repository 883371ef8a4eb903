"""The HTTP endpoint (--http / the "http" key): /metrics after a known workload,
checked by promtool and by a real Prometheus server scraping it; /healthz,
/readyz (also while draining after SIGTERM), /exports, unknown paths and
methods, POST /reload of an unchanged config, handshakes that fail counted by
reason, and hostile HTTP that must not disturb the NBD side."""
import json
import os
import struct
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from strata_test import Server, log, main, run, sparse_image, workdir
from tls_certs import make_psk

RW_SIZE = 16 << 20
RO_SIZE = 8 << 20
N_READS, READ_SIZE = 7, 4096
M_WRITES, WRITE_SIZE = 5, 8192

HTTP_LINE = re.compile(r"http endpoint on http://127\.0\.0\.1:(\d+)")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


def wait_for(cond, what, timeout=60, proc=None):
    """Polls cond() until it returns a true value (which is returned)."""
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"process exited while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def http(port, path, method="GET", data=None, timeout=10):
    """(status, body text) of one request."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def parse_metrics(text):
    """{(name, frozenset of label pairs): value} of an exposition page."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"malformed sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


class Strata:
    """strata serving export "rw" (read-write) and "ro" (read-only) on a unix
    socket, with the HTTP endpoint on a free loopback port."""

    def __init__(self, d, drain_timeout_ms=30000):
        self.d = d
        self.rw = sparse_image(d, "rw.raw", RW_SIZE)
        self.ro = sparse_image(d, "ro.raw", RO_SIZE)
        self.config = os.path.join(d, "strata.json")
        self.server = Server(config=self.config, export="rw")
        with open(self.config, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": self.server.sock}],
                       "exports": [{"name": "rw", "path": self.rw, "format": "raw"},
                                   {"name": "ro", "path": self.ro, "format": "raw",
                                    "read_only": True}],
                       "limits": {"drain_timeout_ms": drain_timeout_ms},
                       "http": {"address": "127.0.0.1", "port": 0}}, f)

    def __enter__(self):
        self.server.start()
        m = HTTP_LINE.search(self.server.read_log())
        assert m, "no http endpoint line in the log:\n" + self.server.read_log()
        self.port = int(m.group(1))
        return self

    def __exit__(self, *exc):
        return self.server.__exit__(*exc)

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.server.sock}"

    def handle(self, export):
        import nbd
        h = nbd.NBD()
        h.connect_uri(self.uri(export))
        return h

    def scrape(self):
        status, body, headers = http(self.port, "/metrics")
        assert status == 200, (status, body)
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8", headers
        return body


def run_workload(s):
    """N reads and M writes of known sizes on "rw", one write to "ro" (EPERM).
    Returns once every connection has closed (the clients gauge says so)."""
    import nbd
    h = s.handle("rw")
    for i in range(M_WRITES):
        h.pwrite(bytes([i + 1]) * WRITE_SIZE, i * WRITE_SIZE)
    for i in range(N_READS):
        assert h.pread(READ_SIZE, i * READ_SIZE) == bytes([i * READ_SIZE // WRITE_SIZE + 1]) * READ_SIZE
    h.shutdown()
    ro = s.handle("ro")
    ro.set_strict_mode(0)  # send the write: the server, not libnbd, must refuse it
    try:
        ro.pwrite(b"x" * 512, 0)
        raise AssertionError("a write to the read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", e
    ro.shutdown()
    wait_for(lambda: all(metric(parse_metrics(s.scrape()), "strata_export_clients", export=e) == 0
                         for e in ("rw", "ro")), "both clients to be gone")


# The values the workload must leave, as (PromQL selector, value).
def expected_values():
    return [
        ('strata_requests_total{export="rw",command="read"}', N_READS),
        ('strata_requests_total{export="rw",command="write"}', M_WRITES),
        ('strata_read_bytes_total{export="rw"}', N_READS * READ_SIZE),
        ('strata_written_bytes_total{export="rw"}', M_WRITES * WRITE_SIZE),
        ('strata_errors_total{export="ro",errno="EPERM"}', 1),
        ('strata_requests_total{export="ro",command="write"}', 1),
        ('strata_written_bytes_total{export="ro"}', 0),
        ('sum(strata_errors_total{export="rw"})', 0),
        ('strata_request_duration_seconds_count{export="rw",command="read"}', N_READS),
        ('strata_request_duration_seconds_count{export="rw",command="write"}', M_WRITES),
    ]


def check_page(samples):
    for selector, want in expected_values():
        if selector.startswith("sum("):
            inner = selector[4:-1]
            name, labels = inner.split("{")
            labels = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            got = sum(v for (n, ls), v in samples.items()
                      if n == name and set(labels.items()) <= ls)
        else:
            name, labels = selector.split("{")
            got = metric(samples, name, **dict(re.findall(r'(\w+)="([^"]*)"', labels)))
        assert got == want, f"{selector} = {got}, want {want}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prometheus(d, target_port):
    """A Prometheus server scraping 127.0.0.1:target_port every second; its
    own port is picked free, and picked again if someone took it first."""
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                "scrape_configs:\n  - job_name: strata\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{target_port}']\n")
    for attempt in range(5):
        port = free_port()
        tsdb = tempfile.mkdtemp(dir=d, prefix="tsdb-")
        cmd = ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
               f"--web.listen-address=127.0.0.1:{port}"]
        log("+", " ".join(cmd))
        logf = open(os.path.join(d, f"prometheus-{attempt}.log"), "w")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while p.poll() is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return p, port
            except OSError:
                pass
            time.sleep(0.1)
        p.kill()
        p.wait()
        with open(logf.name) as f:
            text = f.read()
        log(text[-2000:])
        assert "address already in use" in text, "prometheus did not start"
    raise AssertionError("no free port for prometheus after 5 attempts")


def prometheus_value(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        reply = json.load(r)
    assert reply["status"] == "success", reply
    result = reply["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_metrics_after_a_known_workload_pass_promtool_and_prometheus_agrees():
    with workdir() as d, Strata(d) as s:
        run_workload(s)
        page = s.scrape()
        path = os.path.join(d, "metrics.txt")
        with open(path, "w") as f:
            f.write(page)
        run(["sh", "-c", f"promtool check metrics < {path}"])
        samples = parse_metrics(page)
        check_page(samples)
        assert metric(samples, "strata_build_info", version="0.1.0") == 1
        assert metric(samples, "strata_start_time_seconds") <= time.time()
        assert metric(samples, "strata_connections_open") == 0
        assert metric(samples, "strata_connections_total") >= 2

        if shutil.which("prometheus") is None:
            log("SKIP: no prometheus binary; the promtool check above still ran")
            return
        prom, prom_port = start_prometheus(d, s.port)
        try:
            for query, want in expected_values():
                wait_for(lambda: prometheus_value(prom_port, query) == want,
                         f"prometheus to report {query} == {want}", proc=prom)
                log(f"prometheus: {query} == {want}")
        finally:
            prom.terminate()
            prom.wait(timeout=30)


def test_probes_exports_and_errors():
    with workdir() as d, Strata(d) as s:
        assert http(s.port, "/healthz")[:2] == (200, "ok\n")
        assert http(s.port, "/readyz")[0] == 200
        h = s.handle("rw")
        status, body, headers = http(s.port, "/exports")
        assert status == 200 and headers["Content-Type"] == "application/json", (status, headers)
        assert json.loads(body) == [
            {"name": "rw", "format": ["raw"], "size": RW_SIZE, "read_only": False, "clients": 1},
            {"name": "ro", "format": ["raw"], "size": RO_SIZE, "read_only": True, "clients": 0},
        ], body
        h.shutdown()
        assert http(s.port, "/nope")[0] == 404
        assert http(s.port, "/metrics", method="POST", data=b"")[0] == 405
        assert http(s.port, "/reload")[0] == 405
        status, body, _ = http(s.port, "/reload", method="POST", data=b"")
        assert (status, body) == (200, "applied: 0 added, 0 removed, 0 changed, 2 unchanged\n"), \
            (status, body)


def test_hostile_http_does_not_disturb_nbd():
    with workdir() as d, Strata(d) as s:
        h = s.handle("rw")
        h.pwrite(b"k" * 4096, 0)
        # Each ends with EOF only when it is not a whole request: the server
        # must answer the others by itself (an error status) and close.
        requests = [
            b"\x00\xff garbage that is not HTTP at all\r\n\r\n",
            b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # over the URI limit
            b"GET /metrics HTTP/1.1\r\n" + b"X-Long: " + b"b" * 100_000 + b"\r\n\r\n",
            b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n" + b"c" * 65536,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n",  # never finished: the read timeout ends it
        ]
        for raw in requests:
            c = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            try:
                c.sendall(raw)
                if not raw.endswith(b"\r\n\r\n"):
                    c.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            except OSError as e:  # the server may close before reading it all
                log(f"connection ended: {e}")
                reply = b""
            finally:
                c.close()
            status_line = reply.split(b"\r\n", 1)[0]
            log(f"{raw[:40]!r}... -> {status_line!r}")
            assert reply == b"" or re.match(rb"HTTP/1\.1 4\d\d ", status_line), reply[:200]
            assert s.server.alive()
        assert h.pread(4096, 0) == b"k" * 4096
        h.shutdown()
        assert http(s.port, "/healthz")[:2] == (200, "ok\n")
        assert http(s.port, "/readyz")[0] == 200


def connect_fails(uri, psk_file=None):
    """A libnbd client to `uri` that must not get through the handshake."""
    import nbd
    h = nbd.NBD()
    if psk_file:
        h.set_uri_allow_local_file(True)
        uri += f"?tls-psk-file={psk_file}"
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        log(f"{uri}: {e}")
        return
    raise AssertionError(f"connecting to {uri} should have failed")


def raw_handshake(port, client_flags=None):
    """A plain socket past the greeting; sends `client_flags` if given, then
    waits until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        greeting = b""
        while len(greeting) < 18:
            chunk = c.recv(18 - len(greeting))
            assert chunk, "the server closed before its greeting"
            greeting += chunk
        assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
        if client_flags is not None:
            c.sendall(struct.pack(">I", client_flags))
        while c.recv(4096):
            pass


def test_handshake_failures_are_counted_by_reason():
    """One connection per reason, over a TCP listener in TLS mode "on" with
    PSK users alice (allowed on "rw") and bob (not), a TLS-only export, and a
    short handshake timeout; then one good TLS client."""
    with workdir() as d:
        img = sparse_image(d, "rw.raw", RW_SIZE)
        keys = make_psk(os.path.join(d, "keys.psk"), "alice")
        with open(keys, "a") as f, open(make_psk(os.path.join(d, "bob.psk"), "bob")) as b:
            f.write(b.read())
        wrong = make_psk(os.path.join(d, "wrong.psk"), "alice")  # alice, another key
        conf = os.path.join(d, "strata.json")
        with open(conf, "w") as f:
            json.dump({"tls": {"mode": "on", "psk_file": keys},
                       "listeners": [{"type": "tcp", "address": "127.0.0.1", "port": 0}],
                       "exports": [{"name": "rw", "path": img, "format": "raw", "allow": ["alice"]},
                                   {"name": "secret", "path": sparse_image(d, "s.raw", RO_SIZE),
                                    "format": "raw",
                                    "read_only": True, "tls_required": True}],
                       "limits": {"handshake_timeout_ms": 1000},
                       "http": {"address": "127.0.0.1", "port": 0}}, f)
        with Server(config=conf, tcp=True, unix=False, export="rw") as srv:
            port = int(HTTP_LINE.search(srv.read_log()).group(1))
            nbd_uri = f"nbd://127.0.0.1:{srv.port}"
            tls_uri = f"nbds://{{user}}@127.0.0.1:{srv.port}/rw"
            # The start-up probe of the test harness connected already.
            before = metric(parse_metrics(http(port, "/metrics")[1]), "strata_connections_total")
            connect_fails(f"{nbd_uri}/nope")                                   # unknown_export
            connect_fails(f"{nbd_uri}/secret")                                 # tls_required
            connect_fails(tls_uri.format(user="bob"), keys)                    # policy
            connect_fails(tls_uri.format(user="alice"), wrong)                 # tls_handshake
            raw_handshake(srv.port)                                            # timeout
            raw_handshake(srv.port, client_flags=0xFFFFFFFF)                   # protocol
            import nbd
            h = nbd.NBD()
            h.set_uri_allow_local_file(True)
            h.connect_uri(tls_uri.format(user="alice") + f"?tls-psk-file={keys}")
            h.pwrite(b"a" * 4096, 0)
            h.shutdown()

            def counts():
                samples = parse_metrics(http(port, "/metrics")[1])
                return {r: metric(samples, "strata_handshakes_failed_total", reason=r)
                        for r in ("unknown_export", "tls_required", "policy", "tls_handshake",
                                  "timeout", "protocol")}
            want = dict.fromkeys(counts(), 1)
            wait_for(lambda: counts() == want, f"every reason counted once: {want}")
            samples = parse_metrics(http(port, "/metrics")[1])
            assert metric(samples, "strata_tls_handshakes_total") == 3
            assert metric(samples, "strata_tls_handshakes_failed_total") == 1
            assert metric(samples, "strata_connections_total") == before + 7
            assert metric(samples, "strata_written_bytes_total", export="rw") == 4096
            assert srv.alive()


def test_http_port_in_use_stops_the_server_with_its_address():
    with workdir() as d, socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        img = sparse_image(d, "rw.raw", RW_SIZE)
        p = subprocess.run([os.environ["STRATA"], "serve", img, "--format", "raw",
                            "--socket", os.path.join(d, "s.sock"), "--http", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        log(p.stderr.strip())
        assert p.returncode != 0
        assert f"cannot listen for HTTP on 127.0.0.1:{port}" in p.stderr, p.stderr


def test_readyz_is_503_while_draining_and_healthz_stays_200():
    import nbd
    with workdir() as d, Strata(d, drain_timeout_ms=120000) as s:
        h = nbd.NBD()
        # Simple replies carry every byte, holes too: they fill the socket.
        h.set_request_structured_replies(False)
        h.connect_uri(s.uri("rw"))
        # Replies the client does not read: the server cannot finish this
        # connection before the drain timeout, so it stays draining.
        buffers = [nbd.Buffer(1 << 20) for _ in range(64)]
        for i, buf in enumerate(buffers):
            h.aio_pread(buf, (i % 16) << 20)
        wait_for(lambda: metric(parse_metrics(s.scrape()), "strata_requests_in_flight",
                                export="rw") > 0, "requests in flight")
        s.server.proc.send_signal(signal.SIGTERM)
        status, body, _ = wait_for(
            lambda: (r := http(s.port, "/readyz"))[0] == 503 and r, "/readyz to answer 503")
        assert "shutting down" in body, body
        assert http(s.port, "/healthz")[:2] == (200, "ok\n")
        del h  # closes the socket: the connection ends and the server exits
        s.server.proc.wait(timeout=60)
        assert s.server.proc.returncode == 0, s.server.read_log()


if __name__ == "__main__":
    main([test_metrics_after_a_known_workload_pass_promtool_and_prometheus_agrees,
          test_probes_exports_and_errors,
          test_hostile_http_does_not_disturb_nbd,
          test_handshake_failures_are_counted_by_reason,
          test_http_port_in_use_stops_the_server_with_its_address,
          test_readyz_is_503_while_draining_and_healthz_stays_200])
