"""Hot reload of the configuration (SIGHUP, `strata reload --pid-file`, POST
/reload): exports added, removed while their client writes, switched to
read-only or to another image, broken configs refused, TLS certificates
swapped, a client of a removed export that stops reading cut off after the
drain timeout. Throughout each case a client of an export no reload touches
keeps writing on one connection; at the end what it reads back, and the image
file, are what it wrote, byte for byte, and one connection made all of its
writes."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading

import nbd

from strata_test import (STRATA, Server, assert_closed, log, main, raw_handshake, run,
                         send_request, sparse_image, workdir)
from test_metrics import HTTP_LINE, http, wait_for
from test_tls import assert_connect_fails, handle, log_count, wait_for_log
from tls_certs import make_pki

SIZE = 8 << 20
BLOCK = 4096
NBD_CMD_READ = 0


class Rig:
    """strata serving the exports a test lists (name -> (image, extra keys))
    from a config file on a unix socket, with a pid file and the HTTP endpoint
    on a free loopback port. write() rewrites the config; the reload_* methods
    are the three ways to ask for a reload."""

    def __init__(self, d, exports, tls=None, **top):
        self.d = d
        self.conf = os.path.join(d, "strata.json")
        self.pid_file = os.path.join(d, "strata.pid")
        # A TLS client checks the server's certificate against the host name
        # it connected to: TLS goes over TCP.
        self.tls = tls
        self.top = top  # top-level keys every write() keeps
        self.server = Server(config=self.conf, export=next(iter(exports)), tcp=bool(tls),
                             unix=not tls)
        self.write(exports)

    def write(self, exports, **top):
        listener = {"type": "tcp", "address": "127.0.0.1", "port": 0} if self.tls else \
            {"type": "unix", "path": self.server.sock}
        conf = {"listeners": [listener],
                "exports": [{"name": name, "path": path, "format": "raw", **extra}
                            for name, (path, extra) in exports.items()],
                "http": {"address": "127.0.0.1", "port": 0},
                "pid_file": self.pid_file, **self.top, **top}
        if self.tls:
            conf["tls"] = self.tls
        with open(self.conf, "w") as f:
            json.dump(conf, f)

    def __enter__(self):
        self.server.start()
        wait_for(lambda: os.path.exists(self.pid_file), "the pid file")
        self.port = int(HTTP_LINE.search(self.server.read_log()).group(1))
        return self

    def __exit__(self, *exc):
        return self.server.__exit__(*exc)

    def uri(self, export, ca=None):
        if ca is None:
            return f"nbd+unix:///{export}?socket={self.server.sock}"
        return f"nbds://127.0.0.1:{self.server.port}/{export}?tls-certificates={ca}"

    def outcomes(self):
        return log_count(self.server, r"reload (applied|refused)")

    def reload_http(self):
        """(status, body) of POST /reload."""
        status, body, _ = http(self.port, "/reload", method="POST", data=b"")
        return status, body

    def reload_signal(self):
        """SIGHUP; returns the log line of its outcome."""
        before = self.outcomes()
        self.server.proc.send_signal(signal.SIGHUP)
        return self._outcome_after(before)

    def reload_command(self):
        """`strata reload --pid-file`; returns the log line of its outcome."""
        before = self.outcomes()
        run([STRATA, "reload", "--pid-file", self.pid_file])
        return self._outcome_after(before)

    def _outcome_after(self, before):
        wait_for(lambda: self.outcomes() > before, "the reload's log line", proc=self.server.proc)
        return re.findall(r"reload (?:applied|refused).*", self.server.read_log())[-1]

    def wait_closed(self, export):
        wait_for_log(self.server, rf"export '{export}': closed")


class Keeper(threading.Thread):
    """A client of an export no reload touches: writes random blocks on one
    connection until finish(), remembering every byte it wrote."""

    def __init__(self, uri):
        super().__init__(daemon=True)
        self.h = handle()
        self.h.connect_uri(uri)
        self.shadow = bytearray(self.h.get_size())  # the image starts all zero
        self.writes = 0
        self.error = None
        self.done = threading.Event()
        self.start()

    def run(self):
        try:
            i = 0
            blocks = len(self.shadow) // BLOCK
            while not self.done.is_set():
                off = (i * 7919 % blocks) * BLOCK
                data = os.urandom(BLOCK)
                self.h.pwrite(data, off)
                self.shadow[off:off + BLOCK] = data
                self.writes += 1
                i += 1
                if i % 64 == 0:
                    self.h.flush()
        except Exception as e:  # noqa: BLE001 - reported by check()
            self.error = e

    def check(self):
        """Still writing without an error: 20 more writes go through."""
        n = self.writes
        wait_for(lambda: self.error or self.writes >= n + 20, "the keeper's writes")
        assert self.error is None, self.error

    def finish(self, rig, image, fmt="raw"):
        self.check()
        self.done.set()
        self.join(timeout=60)
        assert self.error is None, self.error
        assert self.h.pread(len(self.shadow), 0) == bytes(self.shadow)
        self.h.shutdown()
        rig.server.stop()
        if fmt != "raw":  # what qemu-img reads of it, as raw bytes
            run(["qemu-img", "check", "-f", fmt, image])
            flat = image + ".flat"
            run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, flat])
            image = flat
        with open(image, "rb") as f:
            assert f.read() == bytes(self.shadow)
        # One connection made every write: never dropped, never reconnected
        # (other clients of "keep" only read).
        writers = [int(w) for w in re.findall(r"export='keep' reads=\d+ writes=(\d+)",
                                              rig.server.log_text) if int(w) > 0]
        assert writers == [self.writes], (writers, self.writes)


def images(d, *names):
    return {n: sparse_image(d, n + ".raw", SIZE) for n in names}


def read_block(h, off=0):
    return h.pread(BLOCK, off)


def test_add_export():
    with workdir() as d:
        img = images(d, "new")
        # The untouched export is a qcow2 here: its metadata caches must
        # come through the reload as well.
        img["keep"] = os.path.join(d, "keep.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", img["keep"], str(SIZE)])
        qcow2 = {"format": "qcow2"}
        with Rig(d, {"keep": (img["keep"], qcow2)}) as rig:
            keeper = Keeper(rig.uri("keep"))
            assert_connect_fails(rig.uri("new"))
            assert "connected from" not in rig.server.read_log()  # a debug line
            rig.write({"keep": (img["keep"], qcow2), "new": (img["new"], {})}, log_level="debug")
            assert rig.reload_http() == (200, "applied: 1 added, 0 removed, 0 changed, "
                                              "1 unchanged\n")
            keeper.check()
            h = handle()
            h.connect_uri(rig.uri("new"))
            wait_for_log(rig.server, r"conn \d+: connected from")
            h.pwrite(b"n" * BLOCK, 0)
            assert read_block(h) == b"n" * BLOCK
            h.shutdown()
            assert [e["name"] for e in json.loads(http(rig.port, "/exports")[1])] == ["keep",
                                                                                      "new"]
            metrics = http(rig.port, "/metrics")[1]
            assert 'export="new"' in metrics, metrics
            keeper.finish(rig, img["keep"], "qcow2")
        with open(img["new"], "rb") as f:
            assert f.read(BLOCK) == b"n" * BLOCK


def write_until_cut_off(h, blocks, cut_off):
    """Keeps 16 writes of distinct blocks in flight on `h` until the server
    stops taking them; calls cut_off() once 64 have completed. Returns
    {offset: data} of the writes that completed and {offset: (data, errno)}
    of those that failed."""
    pending, done, failed = {}, {}, {}
    slot, stopped = 0, False
    while True:
        while not stopped and len(pending) < 16 and slot < blocks:
            data = slot.to_bytes(4, "little") * (BLOCK // 4)
            try:
                pending[h.aio_pwrite(data, slot * BLOCK)] = (slot * BLOCK, data)
            except nbd.Error:
                stopped = True
            slot += 1
        if not pending:
            return done, failed
        if not (h.aio_is_dead() or h.aio_is_closed()):
            h.poll(1000)
        for cookie, (off, data) in list(pending.items()):
            try:
                if not h.aio_command_completed(cookie):
                    continue
                done[off] = data
                if len(done) == 64:
                    cut_off()
            except nbd.Error as e:
                failed[off] = (data, e.errno)
                stopped = True
            del pending[cookie]


def test_remove_export_while_its_client_writes():
    with workdir() as d:
        img = images(d, "keep")
        gone = sparse_image(d, "gone.raw", 64 << 20)
        with Rig(d, {"keep": (img["keep"], {}), "gone": (gone, {})}) as rig:
            keeper = Keeper(rig.uri("keep"))
            h = handle()
            h.connect_uri(rig.uri("gone"))
            rig.write({"keep": (img["keep"], {})})
            # Scrapes go on while the export and its metrics go away.
            scraped, scraping = [], threading.Event()

            def scrape():
                while not scraping.is_set():
                    scraped.append(http(rig.port, "/metrics")[0])
            scraper = threading.Thread(target=scrape)
            scraper.start()
            before = rig.outcomes()
            done, failed = write_until_cut_off(
                h, (64 << 20) // BLOCK, lambda: rig.server.proc.send_signal(signal.SIGHUP))
            assert rig._outcome_after(before).startswith(
                "reload applied: 0 added, 1 removed, 0 changed, 1 unchanged")
            log(f"{len(done)} writes completed, {len(failed)} failed: "
                f"{sorted(set(e for _, e in failed.values()))}")
            assert failed, "the client was never stopped"
            rig.wait_closed("gone")
            scraping.set()
            scraper.join()
            assert scraped and set(scraped) == {200}, scraped
            executed = int(re.search(r"export='gone' reads=\d+ writes=\d+ other=\d+ errors=\d+ "
                                     r"bytes_read=\d+ bytes_written=(\d+)",
                                     rig.server.read_log()).group(1)) // BLOCK
            # Every write the server executed is in the file, whole, whether
            # or not its reply reached the client: a client that goes on
            # sending sees its socket fail (EPIPE) once the server stops
            # reading, and libnbd then fails the commands whose replies it
            # has not read yet (ENOTCONN). Every acknowledged write is among
            # them; none answered ESHUTDOWN is.
            on_disk = set()
            with open(gone, "rb") as f:
                for off, data in list(done.items()) + [(o, d) for o, (d, _) in failed.items()]:
                    f.seek(off)
                    got = f.read(BLOCK)
                    assert got in (data, bytes(BLOCK)), off
                    if got == data:
                        on_disk.add(off)
            assert set(done) <= on_disk
            assert not {o for o, (_, e) in failed.items() if e == "ESHUTDOWN"} & on_disk
            assert len(on_disk) == executed, (len(on_disk), executed)
            assert_connect_fails(rig.uri("gone"))
            assert 'strata_handshakes_failed_total{reason="unknown_export"} 1' in \
                http(rig.port, "/metrics")[1]
            assert [e["name"] for e in json.loads(http(rig.port, "/exports")[1])] == ["keep"]
            assert 'export="gone"' not in http(rig.port, "/metrics")[1]
            # Its image is closed and unlocked: another process may open it.
            run(["qemu-img", "info", "-f", "raw", gone])
            keeper.finish(rig, img["keep"])


def test_removed_export_client_that_does_not_read_is_cut_off():
    with workdir() as d:
        img = images(d, "keep", "gone")
        with Rig(d, {"keep": (img["keep"], {}), "gone": (img["gone"], {})},
                 limits={"drain_timeout_ms": 500}) as rig:
            keeper = Keeper(rig.uri("keep"))
            s = rig.server.connect_raw()
            raw_handshake(s, "gone")
            # 8 MiB of replies that are never read: the server's sends block.
            for i in range(8):
                send_request(s, NBD_CMD_READ, offset=i << 20, length=1 << 20, cookie=i)
            rig.write({"keep": (img["keep"], {})})
            assert rig.reload_http()[0] == 200
            # Long before the 120 s send timeout: the drain timeout closes it.
            rig.wait_closed("gone")
            assert_closed(s)
            sent = int(re.search(r"export='gone' .* bytes_read=(\d+)", rig.server.read_log())
                       .group(1))
            assert sent < 8 << 20, sent
            keeper.finish(rig, img["keep"])


def test_change_to_read_only():
    with workdir() as d:
        img = images(d, "keep", "flip")
        with Rig(d, {"keep": (img["keep"], {}), "flip": (img["flip"], {})}) as rig:
            keeper = Keeper(rig.uri("keep"))
            h = handle()
            h.connect_uri(rig.uri("flip"))
            h.pwrite(b"w" * BLOCK, 0)
            assert not h.is_read_only()
            rig.write({"keep": (img["keep"], {}), "flip": (img["flip"], {"read_only": True})})
            assert rig.reload_command().startswith(
                "reload applied: 0 added, 0 removed, 1 changed, 1 unchanged")
            rig.wait_closed("flip")
            wait_for_log(rig.server, r"export 'flip': raw .*read-only")

            def connected():
                try:
                    ro = handle()
                    ro.set_strict_mode(0)  # send the write: the server must refuse it
                    ro.connect_uri(rig.uri("flip"))
                    return ro
                except nbd.Error:
                    return None
            ro = wait_for(connected, "the read-only export to be offered again")
            assert ro.is_read_only()
            assert read_block(ro) == b"w" * BLOCK
            try:
                ro.pwrite(b"x" * BLOCK, 0)
                raise AssertionError("a write to the now read-only export succeeded")
            except nbd.Error as e:
                assert e.errno == "EPERM", e
            ro.shutdown()
            keeper.finish(rig, img["keep"])


def test_change_path():
    with workdir() as d:
        img = images(d, "keep", "a", "b")
        for name in ("a", "b"):
            with open(img[name], "r+b") as f:
                f.write(name.encode() * BLOCK)
        with Rig(d, {"keep": (img["keep"], {}), "moved": (img["a"], {})}) as rig:
            keeper = Keeper(rig.uri("keep"))
            old = handle()
            old.connect_uri(rig.uri("moved"))
            assert read_block(old) == b"a" * BLOCK
            rig.write({"keep": (img["keep"], {}), "moved": (img["b"], {})})
            assert rig.reload_http() == (200, "applied: 0 added, 0 removed, 1 changed, "
                                              "1 unchanged\n")
            # Another image: no lock in the way, the new one is offered at once.
            h = handle()
            h.connect_uri(rig.uri("moved"))
            assert read_block(h) == b"b" * BLOCK
            h.shutdown()
            assert http(rig.port, "/readyz")[0] == 200
            # The old connection was drained and closed by the server.
            rig.wait_closed("moved")
            try:
                read_block(old)
                raise AssertionError("the old client of the changed export still reads")
            except nbd.Error:
                pass
            keeper.finish(rig, img["keep"])


def test_broken_configs_are_refused():
    with workdir() as d:
        img = images(d, "keep", "other")
        served = {"keep": (img["keep"], {}), "other": (img["other"], {})}
        with Rig(d, served) as rig:
            keeper = Keeper(rig.uri("keep"))
            with open(rig.conf, "w") as f:
                f.write('{"exports": [ {"name": "keep", ')
            status, body = rig.reload_http()
            assert status == 409 and body.startswith("refused: config:"), (status, body)
            missing = os.path.join(d, "missing.raw")
            rig.write({"keep": (img["keep"], {}), "new": (missing, {})})
            status, body = rig.reload_http()
            assert status == 409 and missing in body, (status, body)
            assert rig.reload_signal().startswith("reload refused")
            # Listeners are fixed for the life of the process.
            rig.write(served)
            with open(rig.conf) as f:
                conf = json.load(f)
            conf["listeners"].append({"type": "unix", "path": os.path.join(d, "more.sock")})
            with open(rig.conf, "w") as f:
                json.dump(conf, f)
            status, body = rig.reload_http()
            assert status == 409 and "listeners" in body and "restart" in body, (status, body)
            keeper.check()
            assert_connect_fails(rig.uri("new"))
            h = handle()
            h.connect_uri(rig.uri("other"))
            h.pwrite(b"o" * BLOCK, 0)
            h.shutdown()
            assert [e["name"] for e in json.loads(http(rig.port, "/exports")[1])] == ["keep",
                                                                                      "other"]
            keeper.finish(rig, img["keep"])
            assert "export 'other': closed" not in rig.server.log_text


def test_tls_certificates_are_swapped():
    with workdir() as d:
        img = images(d, "keep")
        old, new = make_pki(os.path.join(d, "old")), make_pki(os.path.join(d, "new"))
        live = os.path.join(d, "live")
        shutil.copytree(old.server, live)
        tls = {"mode": "require", "certificates": live}
        with Rig(d, {"keep": (img["keep"], {})}, tls=tls) as rig:
            keeper = Keeper(rig.uri("keep", ca=old.ca_only))
            assert_connect_fails(rig.uri("keep", ca=new.ca_only))
            for name in os.listdir(new.server):
                shutil.copy(os.path.join(new.server, name), os.path.join(live, name))
            assert rig.reload_signal().startswith(
                "reload applied: 0 added, 0 removed, 0 changed, 1 unchanged")
            h = handle()
            h.connect_uri(rig.uri("keep", ca=new.ca_only))
            assert h.get_tls_negotiated()
            h.shutdown()
            assert_connect_fails(rig.uri("keep", ca=old.ca_only))
            # A certificate that does not load refuses the reload; the ones
            # in use stay.
            with open(os.path.join(live, "server-cert.pem"), "w") as f:
                f.write("not a certificate\n")
            assert rig.reload_signal().startswith("reload refused: TLS")
            h = handle()
            h.connect_uri(rig.uri("keep", ca=new.ca_only))
            h.shutdown()
            keeper.finish(rig, img["keep"])


def test_without_config_reload_is_refused():
    with workdir() as d:
        img = sparse_image(d, "disk.raw", SIZE)
        with Server(img, "--format", "raw", "--http", "127.0.0.1:0") as srv:
            port = int(HTTP_LINE.search(srv.read_log()).group(1))
            status, body, _ = http(port, "/reload", method="POST", data=b"")
            assert status == 409 and "without --config" in body, (status, body)
            srv.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: log_count(srv, r"reload refused") == 2, "the SIGHUP's refusal")
            assert srv.alive()


def test_reload_command_errors():
    with workdir() as d:
        missing = os.path.join(d, "none.pid")
        p = run([STRATA, "reload", "--pid-file", missing], check=False)
        assert p.returncode != 0 and "cannot read pid file" in p.stderr, p.stderr
        garbage = os.path.join(d, "garbage.pid")
        with open(garbage, "w") as f:
            f.write("hello\n")
        p = run([STRATA, "reload", "--pid-file", garbage], check=False)
        assert p.returncode != 0 and "does not hold a process id" in p.stderr, p.stderr
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = os.path.join(d, "stale.pid")
        with open(stale, "w") as f:
            f.write(f"{dead.pid}\n")
        p = run([STRATA, "reload", "--pid-file", stale], check=False)
        assert p.returncode != 0 and "stale" in p.stderr, p.stderr
        # A pid reused by another program: it is not sent SIGHUP.
        other = subprocess.Popen(["sleep", "60"])
        try:
            with open(stale, "w") as f:
                f.write(f"{other.pid}\n")
            p = run([STRATA, "reload", "--pid-file", stale], check=False)
            assert p.returncode != 0 and "not a strata server" in p.stderr, p.stderr
            assert other.poll() is None
        finally:
            other.kill()
            other.wait()


if __name__ == "__main__":
    main([test_add_export, test_remove_export_while_its_client_writes,
          test_removed_export_client_that_does_not_read_is_cut_off, test_change_to_read_only,
          test_change_path, test_broken_configs_are_refused, test_tls_certificates_are_swapped,
          test_without_config_reload_is_refused, test_reload_command_errors])
