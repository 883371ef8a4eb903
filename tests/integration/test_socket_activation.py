"""Socket activation (sd_listen_fds(3)): the server accepts on the sockets a
service manager passes in (systemd-socket-activate, libnbd's [ CMD ] form)
instead of binding its own, with the top-level TLS settings; LISTEN_PID of
another process is ignored. Unix sockets only: systemd-socket-activate needs a
concrete TCP port, and tests never pick one."""
import json
import os
import signal
import subprocess
import time

import nbd

from strata_test import STRATA, Server, log, main, run, tls_psk, workdir

ACTIVATE = "/usr/bin/systemd-socket-activate"
SIZE = 4 << 20


def make_image(d):
    img = os.path.join(d, "disk.raw")
    with open(img, "wb") as f:
        f.truncate(SIZE)
    return img


class Activated:
    """`systemd-socket-activate -l SOCK strata serve ...`: it binds SOCK, and
    on the first connection execs strata with the socket as fd 3. Ready as
    soon as SOCK exists (it is listening then: bind and listen come before
    the path can be connected to, and the first client waits in the backlog
    while strata starts)."""

    def __init__(self, d, *serve_args):
        self.sock = os.path.join(d, "activated.sock")
        self.logfile = os.path.join(d, "activated.log")
        self.cmd = [ACTIVATE, "-l", self.sock, STRATA, "serve", *serve_args]

    def __enter__(self):
        log("+", " ".join(self.cmd))
        self.out = open(self.logfile, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.read_log()
            assert time.time() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        return self

    def read_log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def stop(self):
        # systemd-socket-activate execs strata: the pid is the server's.
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.out.close()
        text = self.read_log()
        assert self.proc.returncode == 0, f"exit status {self.proc.returncode}\n{text}"
        assert "ERROR: AddressSanitizer" not in text and "runtime error:" not in text, text
        return text

    def __exit__(self, exc_type, *exc):
        if self.proc.poll() is None:
            text = self.stop() if exc_type is None else (self.proc.kill(), self.read_log())[1]
            if exc_type is not None:
                log("---- server log ----\n" + text[-5000:])
        return False


def test_systemd_socket_activate_unix_socket():
    with workdir() as d:
        img = make_image(d)
        own = os.path.join(d, "own.sock")
        with Activated(d, img, "--format", "raw", "--export", "test", "--socket", own) as a:
            uri = f"nbd+unix:///test?socket={a.sock}"
            assert int(run(["nbdinfo", "--size", uri]).stdout) == SIZE
            assert int(run(["nbdinfo", "--size", uri]).stdout) == SIZE  # still accepting
            assert not os.path.exists(own), "the --socket listener was bound too"
            text = a.stop()
        assert "socket activation: 1 listening socket(s) passed in" in text, text
        assert f"configured listeners (unix socket {own}) are not bound" in text, text
        assert f"listening on unix socket {a.sock} (fd 3" in text, text
        assert os.path.exists(a.sock), "the activated socket is the manager's: not ours to unlink"


def test_activated_socket_uses_the_top_level_tls_of_a_config():
    with workdir() as d:
        img = make_image(d)
        tls_args, (query, user) = tls_psk(d)
        psk = tls_args[-1]
        listed = os.path.join(d, "listed.sock")
        conf = os.path.join(d, "strata.json")
        with open(conf, "w") as f:
            json.dump({"tls": {"mode": "require", "psk_file": psk},
                       "listeners": [{"type": "unix", "path": listed, "tls": {"mode": "off"}}],
                       "exports": [{"name": "test", "path": img, "format": "raw"}]}, f)
        with Activated(d, "--config", conf) as a:
            tls_uri = f"nbds+unix://{user}@/test?socket={a.sock}&{query}"
            assert int(run(["nbdinfo", "--size", tls_uri]).stdout) == SIZE
            plain = run(["nbdinfo", "--size", f"nbd+unix:///test?socket={a.sock}"], check=False)
            assert plain.returncode != 0, "a plain client was served on a TLS-required socket"
            assert not os.path.exists(listed)
            text = a.stop()
        assert "(fd 3, TLS require)" in text, text


def test_libnbd_socket_activation():
    with workdir() as d:
        img = make_image(d)
        serve = ["[", STRATA, "serve", img, "--format", "raw", "]"]
        # Exactly the size: stdout is shared with the server, which says
        # nothing there when activated.
        assert run(["nbdinfo", "--size", "--", *serve]).stdout == f"{SIZE}\n"
        h = nbd.NBD()
        h.connect_systemd_socket_activation([STRATA, "serve", img, "--format", "raw"])
        data = bytes(range(256)) * 16
        h.pwrite(data, 8192)
        h.flush()
        assert h.pread(len(data), 8192) == data
        h.shutdown()
        del h  # closing the handle stops the server (SIGTERM) and waits for it
        with open(img, "rb") as f:
            f.seek(8192)
            assert f.read(len(data)) == data
        out = os.path.join(d, "out.raw")
        run(["nbdcopy", "--", *serve, out])
        with open(out, "rb") as f:
            f.seek(8192)
            assert f.read(len(data)) == data
        assert os.path.getsize(out) == SIZE
        # To stdout, which the server shares: only the image's bytes.
        p = subprocess.run(["nbdcopy", "--", *serve, "-"], capture_output=True, check=True)
        assert len(p.stdout) == SIZE and p.stdout[8192:8192 + len(data)] == data


def test_listen_pid_of_another_process_is_ignored():
    with workdir() as d:
        img = make_image(d)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
        with Server(img, "--format", "raw", env=env) as srv:  # binds its own socket
            assert int(run(["nbdinfo", "--size", srv.uri]).stdout) == SIZE
            text = srv.read_log()
        assert "socket activation" not in text, text


def test_a_broken_activation_environment_is_refused():
    with workdir() as d:
        img = make_image(d)
        # $$ is the shell's pid, which exec hands to strata.
        for fds, why in (("0", "LISTEN_FDS='0'"), ("two", "LISTEN_FDS='two'")):
            p = run(["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS={fds} exec "$0" serve "$1" '
                     f'--socket "$2"', STRATA, img, os.path.join(d, "s.sock")], check=False)
            assert p.returncode == 1 and why in p.stderr, p.stderr
        p = run(["sh", "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve "$1" 3</dev/null',
                 STRATA, img], check=False)
        assert p.returncode == 1 and "fd 3 is not a socket" in p.stderr, p.stderr


if __name__ == "__main__":
    main([test_systemd_socket_activate_unix_socket,
          test_activated_socket_uses_the_top_level_tls_of_a_config,
          test_libnbd_socket_activation,
          test_listen_pid_of_another_process_is_ignored,
          test_a_broken_activation_environment_is_refused])
