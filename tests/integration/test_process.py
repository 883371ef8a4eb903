"""The habits sidecar tools expect of a server process: --pid-file written once
the server accepts and removed at exit, --exit-with-parent, and
--log-format json (every stderr line one JSON object, whatever a message
holds)."""
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

from strata_test import (STRATA, Server, log, main, recv_exact, send_option, sparse_image,
                         workdir)

SIZE = 1 << 20


def make_image(d, name="disk.raw"):
    return sparse_image(d, name, SIZE)


def accepts(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        return recv_exact(s, 8) == b"NBDMAGIC"
    finally:
        s.close()


def wait_for(cond, what, proc=None, timeout=20):
    deadline = time.time() + timeout
    while not cond():
        assert proc is None or proc.poll() is None, f"server exited early: {proc.returncode}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_pid_file_is_written_when_ready_and_removed_at_exit():
    with workdir() as d:
        img = make_image(d)
        sock = os.path.join(d, "nbd.sock")
        pid_file = os.path.join(d, "strata.pid")
        cmd = [STRATA, "serve", img, "--socket", sock, "--pid-file", pid_file]
        log("+", " ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(pid_file), "the pid file", proc)
        # The moment the file is there, the server accepts.
        assert accepts(sock)
        with open(pid_file) as f:
            assert f.read() == f"{proc.pid}\n"
        assert [n for n in os.listdir(d) if ".tmp" in n] == []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert not os.path.exists(pid_file)


def test_pid_file_from_the_config():
    with workdir() as d:
        img = make_image(d)
        pid_file = os.path.join(d, "from-config.pid")
        conf = os.path.join(d, "strata.json")
        srv = Server(config=conf)
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": srv.sock}], "pid_file": pid_file,
                       "exports": [{"name": "test", "path": img}]}, f)
        with srv:
            wait_for(lambda: os.path.exists(pid_file), "the pid file", srv.proc)
            with open(pid_file) as f:
                assert int(f.read()) == srv.proc.pid
        assert not os.path.exists(pid_file)


# The parent: starts the server, prints its pid, then waits to be killed.
PARENT = """
import subprocess, sys, signal
p = subprocess.Popen(sys.argv[1:])
print(p.pid, flush=True)
signal.pause()
"""


def test_exit_with_parent():
    # As a subreaper the test inherits the orphaned server and can wait for
    # its exit status.
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    with workdir() as d:
        img = make_image(d)
        sock = os.path.join(d, "nbd.sock")
        pid_file = os.path.join(d, "strata.pid")
        logfile = open(os.path.join(d, "server.log"), "w")
        cmd = [sys.executable, "-c", PARENT, STRATA, "serve", img, "--socket", sock,
               "--pid-file", pid_file, "--exit-with-parent"]
        parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logfile, text=True)
        server_pid = int(parent.stdout.readline())
        try:
            wait_for(lambda: os.path.exists(pid_file), "the pid file", parent)
            assert accepts(sock)
            parent.kill()
            parent.wait()
            # Generous: the server stops on its own, or the test fails here.
            deadline = time.time() + 60
            while True:
                pid, status = os.waitpid(server_pid, os.WNOHANG)
                if pid:
                    break
                assert time.time() < deadline, "the server outlived its parent"
                time.sleep(0.05)
            logfile.close()
            with open(logfile.name) as f:
                text = f.read()
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, text)
            assert "received signal 15" in text, text
            assert not os.path.exists(pid_file)
        finally:
            if parent.poll() is None:
                parent.kill()
            try:
                os.kill(server_pid, signal.SIGKILL)
                os.waitpid(server_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_log_format_json_escapes_every_message():
    with workdir() as d:
        # A file name no JSON string can hold as is: quote, newline,
        # backslash, a control character and a byte that is not UTF-8.
        odd = os.fsencode(d) + b'/di"sk\n\\\x01\xff.raw'
        with open(odd, "wb") as f:
            f.truncate(SIZE)
        sock = os.path.join(d, "nbd.sock")
        pid_file = os.path.join(d, "strata.pid")
        errlog = os.path.join(d, "stderr.log")
        cmd = [os.fsencode(STRATA), b"serve", odd, b"--format", b"raw", b"--export",
               'caf\u00e9 "q"\t'.encode(), b"--socket", sock.encode(), b"--pid-file",
               pid_file.encode(), b"--log-format", b"json", b"--log-level", b"debug"]
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            wait_for(lambda: os.path.exists(pid_file), "the pid file", proc)
            # A client asking for an export name with odd bytes.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sock)
            recv_exact(s, 18)
            s.sendall((3).to_bytes(4, "big"))
            name = b'no"such\n\xfe\x00'
            send_option(s, 7, len(name).to_bytes(4, "big") + name + b"\0\0")
            recv_exact(s, 20)
            s.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        with open(errlog, "rb") as f:
            raw = f.read()
        assert proc.returncode == 0, raw
        lines = raw.decode("utf-8").splitlines()  # strict: valid UTF-8 throughout
        records = [json.loads(line) for line in lines]
        assert records and all(set(r) == {"time", "level", "logger", "message"}
                               for r in records), lines
        assert all(r["time"].endswith("Z") and r["time"][10] == "T" for r in records)
        messages = "\n".join(r["message"] for r in records)
        assert 'di"sk\n\\\u0001\\xff.raw' in messages, messages
        assert 'caf\u00e9 "q"\t' in messages, messages
        assert any(r["level"] == "info" and r["message"] == "stopped" for r in records)
        assert "unknown export 'no\"such\n\\xfe\u0000'" in messages, messages


def test_log_format_json_for_config_errors():
    with workdir() as d:
        p = subprocess.run([STRATA, "serve", os.path.join(d, 'mis"sing.raw'), "--log-format",
                            "json"], capture_output=True, text=True)
        assert p.returncode == 1
        records = [json.loads(line) for line in p.stderr.splitlines()]
        assert records[-1]["level"] == "error" and 'mis"sing.raw' in records[-1]["message"]


if __name__ == "__main__":
    main([test_pid_file_is_written_when_ready_and_removed_at_exit,
          test_pid_file_from_the_config,
          test_exit_with_parent,
          test_log_format_json_escapes_every_message,
          test_log_format_json_for_config_errors])
