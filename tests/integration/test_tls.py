"""TLS (NBD_OPT_STARTTLS): real clients (nbdinfo, nbdcopy, nbdsh, qemu-img,
qemu-io, python3-libnbd) over X.509 and PSK, every refusal the policy asks
for (on the wire where a client library hides the reply), the handshake's
bounds, configuration errors and the loopback default. After each refusal a
fresh good client is served: one bad client never stops the server.

Credentials are made per run by tests/lib/tls_certs.py (certtool, psktool).
"""
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import warnings

import nbd
from strata_test import (STRATA, Server, assert_closed, file_bytes, log, main, read_option_reply,
                         read_simple_reply, recv_exact, run, send_option, send_request, workdir)
from tls_certs import make_pki, make_psk, psk_lines

SIZE = 4 << 20
FILL = b"\x42"

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT = 8, 9
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_TLS_REQD = 0x80000001, 0x80000002, 0x80000003, 0x80000005
CMD_READ = 0


# ---- set-up ---------------------------------------------------------------------------

def make_image(d, name="disk.raw", size=SIZE):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(FILL * size)
    return path


def write_config(d, exports, tls, **extra):
    """A config with one TCP listener on 127.0.0.1, port chosen by the kernel."""
    conf = os.path.join(d, "strata.json")
    listeners = extra.pop("listeners", [{"type": "tcp", "address": "127.0.0.1", "port": 0}])
    with open(conf, "w") as f:
        json.dump({"tls": tls, "listeners": listeners, "exports": exports, **extra}, f)
    return conf


def config_server(conf, export):
    return Server(config=conf, tcp=True, unix=False, export=export)


def nbds(srv, export=None, user=None, **query):
    """An nbds:// URI for the server; query keys use '_' for '-'. The PSK
    username goes in the URI's user part (libnbd 1.14 has no tls-username
    query parameter)."""
    name = srv.export if export is None else export
    q = "&".join(f"{k.replace('_', '-')}={v}" for k, v in query.items())
    at = f"{user}@" if user else ""
    return f"nbds://{at}127.0.0.1:{srv.port}/{name}" + ("?" + q if q else "")


def wait_for_log(srv, pattern, timeout=30):
    """The server's log matches `pattern` within timeout (log lines of a
    connection may be written just after the client saw its end)."""
    deadline = time.time() + timeout
    while True:
        text = srv.read_log()
        if re.search(pattern, text):
            return text
        if time.time() > deadline:
            raise AssertionError(f"no /{pattern}/ in the server log:\n{text[-4000:]}")
        time.sleep(0.05)


def log_count(srv, pattern):
    return len(re.findall(pattern, srv.read_log()))


# ---- libnbd clients -------------------------------------------------------------------

def handle(opt_mode=False):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)  # tls-certificates and tls-psk-file name local files
    if opt_mode:
        h.set_opt_mode(True)
    return h


def assert_serves(srv, uri, img):
    """A fresh client gets through the handshake and reads what the image holds."""
    h = handle()
    h.connect_uri(uri)
    assert h.get_tls_negotiated() == uri.startswith("nbds:"), uri
    assert h.get_size() == SIZE
    off = SIZE - 4096
    with open(img, "rb") as f:
        f.seek(off)
        want = f.read(512)
    assert h.pread(512, off) == want
    h.shutdown()
    del h
    assert srv.alive()


def assert_connect_fails(uri):
    h = handle()
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        return str(e)
    raise AssertionError(f"connecting to {uri} should have failed")


def list_names(uri):
    h = handle(opt_mode=True)
    h.connect_uri(uri)
    names = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    h.opt_abort()
    return sorted(names)


def go_error(uri, export):
    """Connects in option mode and returns the error of NBD_OPT_GO for `export`."""
    h = handle(opt_mode=True)
    h.connect_uri(uri)
    h.set_export_name(export)
    try:
        h.opt_go()
    except nbd.Error as e:
        h.opt_abort()
        return e
    raise AssertionError(f"opt_go({export!r}) should have failed")


# ---- hand-made handshakes -------------------------------------------------------------

def raw_client(srv):
    """A plain TCP socket past the greeting, with fixed newstyle and no zeroes."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    greeting = recv_exact(s, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT", greeting
    s.sendall(struct.pack(">I", 1 | 2))
    return s


def go_data(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)


def option_header(opt, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data


def replies(s, opt):
    """Every reply to `opt` up to its ACK or error: [(type, data)]."""
    out = []
    while True:
        o, rtype, data = read_option_reply(s)
        assert o == opt, f"a reply for option {o} while waiting for {opt}"
        out.append((rtype, data))
        if rtype == REP_ACK or rtype & 0x80000000:
            return out


def final_reply(s, opt, data=b""):
    send_option(s, opt, data)
    return replies(s, opt)[-1][0]


def raw_list(s):
    send_option(s, OPT_LIST)
    got = replies(s, OPT_LIST)
    assert got[-1][0] == REP_ACK, hex(got[-1][0])
    names = []
    for rtype, data in got[:-1]:
        assert rtype == REP_SERVER, hex(rtype)
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n].decode())
    return sorted(names)


def tls_context(ca_dir, cert_dir=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the chain and the host name
    ctx.load_verify_locations(os.path.join(ca_dir, "ca-cert.pem"))
    if cert_dir:
        ctx.load_cert_chain(os.path.join(cert_dir, "client-cert.pem"),
                            os.path.join(cert_dir, "client-key.pem"))
    return ctx


def start_tls(s, ca_dir, cert_dir=None):
    """STARTTLS, its ACK, then the TLS handshake on the same socket."""
    send_option(s, OPT_STARTTLS)
    assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
    t = tls_context(ca_dir, cert_dir).wrap_socket(s, server_hostname="localhost")
    t.settimeout(10)
    return t


def raw_go_and_read(s, export):
    """GO over an open handshake, then one 512-byte read (simple replies)."""
    send_option(s, OPT_GO, go_data(export))
    got = replies(s, OPT_GO)
    assert got[-1][0] == REP_ACK, hex(got[-1][0])
    send_request(s, CMD_READ, SIZE - 512, 512, cookie=9)
    err, cookie, data = read_simple_reply(s, 512)
    assert (err, cookie) == (0, 9) and len(data) == 512


# ---- 1. real clients over nbds:// -----------------------------------------------------

def exercise_libnbd_tools(d, srv, img, **query):
    """nbdinfo, nbdcopy both ways and nbdsh write/read back over nbds://."""
    uri = nbds(srv, **query)
    info = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    assert info["TLS"] is True, info
    assert info["exports"][0]["export-size"] == SIZE

    out = os.path.join(d, "copy-out.raw")
    run(["nbdcopy", uri, out])
    assert file_bytes(out) == file_bytes(img)

    src = os.path.join(d, "copy-in.raw")
    pattern = bytes(range(256)) * (SIZE // 256 - 16) + FILL * 4096  # the tail stays as it was
    with open(src, "wb") as f:
        f.write(pattern)
    run(["nbdcopy", src, uri])
    assert file_bytes(img) == pattern

    # nbdsh is `python3 -m nbd`: run it with the python that has the module.
    run([sys.executable, "-m", "nbd",
         "-c", "h.set_uri_allow_local_file(True)",  # -u would refuse the local files
         "-c", f"h.connect_uri({uri!r})",
         "-c", "h.pwrite(b'\\x5a' * 65536, 131072)",
         "-c", "h.flush()",
         "-c", "assert h.pread(65536, 131072) == b'\\x5a' * 65536",
         "-c", "assert h.get_tls_negotiated()"])
    assert file_bytes(img)[131072:131072 + 65536] == b"\x5a" * 65536
    os.remove(out)
    os.remove(src)


def test_x509_without_client_certificate():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            assert "serving nbds://127.0.0.1:" in srv.read_log()
            # The client trusts the CA and has no certificate of its own.
            exercise_libnbd_tools(d, srv, img, tls_certificates=pki.ca_only)
            # A client that offers a certificate the server does not ask for.
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)
            assert "identity='CN=" not in srv.read_log()  # an unchecked certificate names nobody
            assert "identity=''" in srv.read_log()


def test_x509_client_certificate_with_verify_peer():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates",
                    pki.server, "--tls-verify-peer", tcp=True) as srv:
            exercise_libnbd_tools(d, srv, img, tls_certificates=pki.client)
            assert f"identity='{pki.client_dn}'" in srv.read_log()
            assert pki.client_dn == "CN=client,O=Strata tests", pki.client_dn


def test_psk():
    with workdir() as d:
        img = make_image(d)
        keys = make_psk(os.path.join(d, "keys.psk"), "alice")
        with Server(img, "--format", "raw", "--tls", "require", "--tls-psk", keys,
                    tcp=True) as srv:
            exercise_libnbd_tools(d, srv, img, tls_psk_file=keys, user="alice")
            assert "identity='alice'" in srv.read_log()

    # With certificates and verify_peer as well, a PSK client still gets in:
    # its key is its proof, verify_peer is about certificates.
    with workdir() as d:
        img = make_image(d)
        pki = make_pki(os.path.join(d, "pki"))
        keys = make_psk(os.path.join(d, "keys.psk"), "alice")
        with Server(img, "--format", "raw", "--tls", "require", "--tls-psk", keys,
                    "--tls-certificates", pki.server, "--tls-verify-peer", tcp=True) as srv:
            assert_serves(srv, nbds(srv, tls_psk_file=keys, user="alice"), img)
            assert "identity='alice'" in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)
            assert f"identity='{pki.client_dn}'" in srv.read_log()


# ---- 2. qemu's client -----------------------------------------------------------------

def qemu_opts(srv, creds):
    return ["--object", creds, "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={srv.port},export={srv.export},tls-creds=tls0"]


def exercise_qemu(srv, img, creds):
    info = run(["qemu-img", "info", "--output=json"] + qemu_opts(srv, creds)).stdout
    assert json.loads(info)["virtual-size"] == SIZE, info
    p = run(["qemu-io"] + qemu_opts(srv, creds) +
            ["-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"])
    assert "Pattern verification failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    assert "read 65536/65536" in p.stdout, p.stdout
    assert file_bytes(img)[:65536] == b"\x5a" * 65536
    with open(img, "r+b") as f:
        f.write(FILL * 65536)


def test_qemu_x509():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            exercise_qemu(srv, img, f"tls-creds-x509,id=tls0,dir={pki.ca_only},endpoint=client")
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates",
                    pki.server, "--tls-verify-peer", tcp=True) as srv:
            exercise_qemu(srv, img, f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client")
            assert f"identity='{pki.client_dn}'" in srv.read_log()
            # Without a client certificate qemu is turned away...
            p = run(["qemu-img", "info"] + qemu_opts(
                srv, f"tls-creds-x509,id=tls0,dir={pki.ca_only},endpoint=client"), check=False)
            assert p.returncode != 0, p.stdout
            # ...and the next client is served.
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)


def test_qemu_psk():
    with workdir() as d:
        img = make_image(d)
        pskdir = os.path.join(d, "psk")
        os.mkdir(pskdir)
        keys = make_psk(os.path.join(pskdir, "keys.psk"), "alice")
        with Server(img, "--format", "raw", "--tls", "require", "--tls-psk", keys,
                    tcp=True) as srv:
            exercise_qemu(srv, img,
                          f"tls-creds-psk,id=tls0,dir={pskdir},username=alice,endpoint=client")
            assert "identity='alice'" in srv.read_log()


# ---- 3. refusals ----------------------------------------------------------------------

def test_require_refuses_plain_options():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            good = nbds(srv, tls_certificates=pki.ca_only)
            s = raw_client(srv)
            assert final_reply(s, OPT_GO, go_data("test")) == ERR_TLS_REQD
            assert final_reply(s, OPT_INFO, go_data("test")) == ERR_TLS_REQD
            assert final_reply(s, OPT_LIST) == ERR_TLS_REQD
            assert final_reply(s, OPT_STRUCTURED_REPLY) == ERR_TLS_REQD
            assert final_reply(s, 0x1234, b"junk") == ERR_TLS_REQD
            assert final_reply(s, OPT_ABORT) == REP_ACK
            assert_closed(s)
            s.close()
            # EXPORT_NAME has no error reply: the server closes.
            s = raw_client(srv)
            send_option(s, OPT_EXPORT_NAME, b"test")
            assert_closed(s)
            s.close()
            # libnbd without TLS sees the same refusals.
            h = handle(opt_mode=True)
            h.set_tls(nbd.TLS_DISABLE)
            h.connect_tcp("127.0.0.1", str(srv.port))
            for call in (lambda: h.opt_list(lambda name, description: 0), h.opt_info, h.opt_go):
                try:
                    call()
                    raise AssertionError("a plain option was answered under --tls require")
                except nbd.Error as e:
                    assert "error" in str(e), e
            h.opt_abort()
            # nbd:// (no TLS) cannot connect; nbds:// can.
            assert_connect_fails(f"nbd://127.0.0.1:{srv.port}/test")
            assert_serves(srv, good, img)


def test_wrong_ca():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            err = assert_connect_fails(nbds(srv, tls_certificates=pki.other_ca))
            assert "certificate" in err.lower() or "verif" in err.lower(), err
            wait_for_log(srv, r"TLS handshake failed")
            # python's ssl module, trusting the other CA, gives up the same way.
            s = raw_client(srv)
            try:
                start_tls(s, pki.other_ca)
                raise AssertionError("the TLS handshake succeeded with the wrong CA")
            except ssl.SSLCertVerificationError:
                pass
            s.close()
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


def verify_peer_server(pki, img):
    return Server(img, "--format", "raw", "--tls", "require", "--tls-certificates", pki.server,
                  "--tls-verify-peer", tcp=True)


def test_expired_client_certificate():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with verify_peer_server(pki, img) as srv:
            assert_connect_fails(nbds(srv, tls_certificates=pki.expired))
            wait_for_log(srv, r"TLS handshake failed")
            assert "export='test'" not in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)


def test_revoked_client_certificate():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates",
                    pki.server_crl, "--tls-verify-peer", tcp=True) as srv:
            assert_connect_fails(nbds(srv, tls_certificates=pki.revoked))
            wait_for_log(srv, r"TLS handshake failed")
            assert "export='test'" not in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)
        # Without the list the same certificate is accepted: the list did it.
        with verify_peer_server(pki, img) as srv:
            assert_serves(srv, nbds(srv, tls_certificates=pki.revoked), img)


def test_client_without_certificate_under_verify_peer():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with verify_peer_server(pki, img) as srv:
            assert_connect_fails(nbds(srv, tls_certificates=pki.ca_only))
            wait_for_log(srv, r"TLS handshake failed")
            # A certificate from another CA is no better than none.
            before = log_count(srv, r"TLS handshake failed")
            assert_connect_fails(nbds(srv, tls_certificates=pki.other_client))
            wait_for_log(srv, r"(?s)(TLS handshake failed.*){%d}" % (before + 1))
            assert "export='test'" not in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.client), img)


def assert_psk_refused(d, client_keys, user):
    """A server knowing only alice's key turns away `user` holding
    `client_keys`, logs no identity for it, and still serves alice."""
    img = make_image(d)
    keys = make_psk(os.path.join(d, "keys.psk"), "alice")
    with Server(img, "--format", "raw", "--tls", "require", "--tls-psk", keys,
                tcp=True) as srv:
        assert_connect_fails(nbds(srv, tls_psk_file=client_keys, user=user))
        wait_for_log(srv, r"TLS handshake failed")
        assert f"identity='{user}'" not in srv.read_log()
        assert_serves(srv, nbds(srv, tls_psk_file=keys, user="alice"), img)
    return keys


def test_wrong_psk_key():
    with workdir() as d:
        other = make_psk(os.path.join(d, "other.psk"), "alice")  # same user, another key
        keys = assert_psk_refused(d, other, "alice")
        assert psk_lines(keys) != psk_lines(other)


def test_unknown_psk_user():
    with workdir() as d:
        mallory = make_psk(os.path.join(d, "mallory.psk"), "mallory")
        assert_psk_refused(d, mallory, "mallory")


def test_allow_list_x509():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = {n: make_image(d, n + ".raw") for n in ("open", "secret", "mine", "glob")}
        conf = write_config(d, [
            {"name": "open", "path": img["open"], "format": "raw"},
            {"name": "secret", "path": img["secret"], "format": "raw",
             "allow": ["CN=someone-else*"]},
            {"name": "mine", "path": img["mine"], "format": "raw",
             "allow": ["CN=nobody", pki.client_dn]},
            {"name": "glob", "path": img["glob"], "format": "raw", "allow": ["CN=client,*"]},
        ], {"mode": "require", "certificates": pki.server, "verify_peer": True})
        with config_server(conf, "open") as srv:
            cert = dict(tls_certificates=pki.client)
            # On the wire: ERR_POLICY at GO and INFO, absent from LIST.
            s = start_tls(raw_client(srv), pki.ca_only, pki.client)
            assert raw_list(s) == ["glob", "mine", "open"]
            assert final_reply(s, OPT_GO, go_data("secret")) == ERR_POLICY
            assert final_reply(s, OPT_INFO, go_data("secret")) == ERR_POLICY
            raw_go_and_read(s, "open")  # the handshake goes on after the refusal
            s.close()
            wait_for_log(srv, r"refused: export 'secret' is not allowed for 'CN=client")
            # libnbd and nbdinfo see the same.
            assert list_names(nbds(srv, "", **cert)) == ["glob", "mine", "open"]
            listed = json.loads(run(["nbdinfo", "--list", "--json",
                                     nbds(srv, "", **cert)]).stdout)
            assert sorted(e["export-name"] for e in listed["exports"]) == ["glob", "mine", "open"]
            e = go_error(nbds(srv, "", **cert), "secret")
            assert "opt_go" in str(e), e
            # Exact and glob entries that match let the client in.
            for name in ("open", "mine", "glob"):
                assert_serves(srv, nbds(srv, name, **cert), img[name])


def test_allow_list_psk():
    with workdir() as d:
        img = {n: make_image(d, n + ".raw") for n in ("open", "alices", "bobs")}
        keys = os.path.join(d, "keys.psk")
        make_psk(keys, "alice")
        make_psk(keys, "bob")  # psktool adds to the file
        assert len(psk_lines(keys)) == 2
        conf = write_config(d, [
            {"name": "open", "path": img["open"], "format": "raw"},
            {"name": "alices", "path": img["alices"], "format": "raw", "allow": ["alice"]},
            {"name": "bobs", "path": img["bobs"], "format": "raw", "allow": ["b?b"]},
        ], {"mode": "require", "psk_file": keys})
        with config_server(conf, "open") as srv:
            alice = dict(tls_psk_file=keys, user="alice")
            bob = dict(tls_psk_file=keys, user="bob")
            assert list_names(nbds(srv, "", **alice)) == ["alices", "open"]
            assert list_names(nbds(srv, "", **bob)) == ["bobs", "open"]
            go_error(nbds(srv, "", **bob), "alices")
            go_error(nbds(srv, "", **alice), "bobs")
            wait_for_log(srv, r"refused: export 'alices' is not allowed for 'bob'")
            assert_serves(srv, nbds(srv, "alices", **alice), img["alices"])
            assert_serves(srv, nbds(srv, "bobs", **bob), img["bobs"])
            assert_serves(srv, nbds(srv, "open", **bob), img["open"])


def test_selective_tls():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = {n: make_image(d, n + ".raw") for n in ("public", "private")}
        conf = write_config(d, [
            {"name": "public", "path": img["public"], "format": "raw"},
            {"name": "private", "path": img["private"], "format": "raw", "tls_required": True},
        ], {"mode": "on", "certificates": pki.server})
        with config_server(conf, "public") as srv:
            assert "serving nbd://127.0.0.1:" in srv.read_log()
            # A plain client: only the public export, ERR_TLS_REQD for the other.
            s = raw_client(srv)
            assert raw_list(s) == ["public"]
            assert final_reply(s, OPT_GO, go_data("private")) == ERR_TLS_REQD
            assert final_reply(s, OPT_INFO, go_data("private")) == ERR_TLS_REQD
            meta = struct.pack(">I", 7) + b"private" + struct.pack(">I", 0)
            assert final_reply(s, OPT_LIST_META_CONTEXT, meta) == ERR_TLS_REQD
            raw_go_and_read(s, "public")
            s.close()
            s = raw_client(srv)
            send_option(s, OPT_EXPORT_NAME, b"private")  # no error reply possible: closed
            assert_closed(s)
            s.close()
            plain = f"nbd://127.0.0.1:{srv.port}/"
            assert list_names(plain) == ["public"]
            assert_connect_fails(plain + "private")
            assert_serves(srv, plain + "public", img["public"])
            # A TLS client: both.
            s = start_tls(raw_client(srv), pki.ca_only)
            assert raw_list(s) == ["private", "public"]
            raw_go_and_read(s, "private")
            s.close()
            tls = dict(tls_certificates=pki.ca_only)
            assert list_names(nbds(srv, "", **tls)) == ["private", "public"]
            assert_serves(srv, nbds(srv, "private", **tls), img["private"])
            assert_serves(srv, nbds(srv, "public", **tls), img["public"])


def test_starttls_pipelined_with_go():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            recv_exact(s, 18)
            # Flags, STARTTLS and a GO in one packet: the GO was sent before TLS
            # and must never be acted on.
            s.sendall(struct.pack(">I", 3) + option_header(OPT_STARTTLS) +
                      option_header(OPT_GO, go_data("test")))
            assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
            t = tls_context(pki.ca_only).wrap_socket(s, server_hostname="localhost")
            t.settimeout(10)
            send_option(t, OPT_LIST)
            opt, rtype, _ = read_option_reply(t)
            assert opt == OPT_LIST, f"first reply after TLS is for option {opt}, not LIST"
            assert rtype == REP_SERVER, hex(rtype)
            assert replies(t, OPT_LIST)[-1][0] == REP_ACK
            raw_go_and_read(t, "test")
            t.close()
            go_bytes = len(option_header(OPT_GO, go_data("test")))
            wait_for_log(srv, rf"dropped {go_bytes} bytes sent before the TLS handshake")
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


class RecordWriter:
    """TLS over a socket through memory BIOs, so the test decides which
    records share a TCP send: ssl's own sockets send each record at once."""

    def __init__(self, s, ca_dir):
        self.s, self.inc, self.out = s, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = tls_context(ca_dir).wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self.receive()
        self.flush()

    def receive(self):
        data = self.s.recv(65536)
        assert data, "the server closed the connection"
        self.inc.write(data)

    def record(self, data):
        """Queues `data` as one TLS record, not sent yet."""
        assert self.obj.write(data) == len(data)

    def pending(self):
        return self.out.read()

    def flush(self):
        if self.out.pending:
            self.s.sendall(self.out.read())

    def read_exact(self, n):
        buf = b""
        while len(buf) < n:
            try:
                buf += self.obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                self.receive()
        return buf


def test_many_records_in_one_segment():
    """Requests in many small records that arrive together, the way a
    client under load sends them: each is answered, with the right data,
    also when a write's payload is a record of its own and when the last
    record is cut in two across sends (the server decrypts what it has,
    then waits for the rest)."""
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = os.path.join(d, "pattern.raw")
        content = bytearray(os.urandom(SIZE))
        with open(img, "wb") as f:
            f.write(content)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            s = raw_client(srv)
            s.settimeout(10)
            send_option(s, OPT_STARTTLS)
            assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
            t = RecordWriter(s, pki.ca_only)
            t.record(option_header(OPT_GO, go_data("test")))
            t.flush()
            while True:
                rtype, plen = struct.unpack(">QIII", t.read_exact(20))[2:]
                t.read_exact(plen)
                if rtype == REP_ACK:
                    break
                assert rtype == REP_INFO, hex(rtype)
            count, length = 300, 512
            expected = {}
            for i in range(count):
                cookie = 1000 + i
                offset = (i * 7919) % (SIZE // length) * length  # distinct: 7919 is odd
                if i % 50 == 25:
                    # A write: header and payload in separate records.
                    payload = bytes([i % 251]) * length
                    t.record(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie, offset, length))
                    t.record(payload)
                    content[offset:offset + length] = payload
                    expected[cookie] = None
                else:
                    t.record(struct.pack(">IHHQQI", 0x25609513, 0, CMD_READ, cookie, offset,
                                         length))
                    expected[cookie] = offset
            wire = t.pending()
            s.sendall(wire[:-3])  # the last record cut in two
            time.sleep(0.2)
            s.sendall(wire[-3:])
            # Replies come out of order, as NBD allows; no two requests touch the
            # same bytes, so each read is checked against the final content.
            got = {}
            while len(got) < count:
                magic, error, cookie = struct.unpack(">IIQ", t.read_exact(16))
                assert magic == 0x67446698 and error == 0, (hex(magic), error)
                assert cookie in expected and cookie not in got, cookie
                got[cookie] = t.read_exact(length) if expected[cookie] is not None else b""
            for cookie, offset in expected.items():
                if offset is not None:
                    assert got[cookie] == bytes(content[offset:offset + length]), cookie
            s.close()
            with open(img, "rb") as f:
                assert f.read() == bytes(content)


def test_garbage_instead_of_client_hello():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            for garbage in (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                            # a handshake record holding a ClientHello of nonsense
                            b"\x16\x03\x01\x00\x10\x01\x00\x00\x0c" + b"\xff" * 12,
                            bytes(range(256)),
                            option_header(OPT_LIST)):  # NBD where TLS should be
                s = raw_client(srv)
                send_option(s, OPT_STARTTLS)
                assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
                s.sendall(garbage)
                assert_closed(s, timeout=30)
                s.close()
            # Each was refused by the TLS library, none left to the timeout.
            wait_for_log(srv, r"(?s)(TLS handshake failed.*){4}")
            assert "handshake timed out" not in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


def partial_client_hello(ca_dir):
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_context(ca_dir).wrap_bio(inc, out, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16" and len(hello) > 40, hello[:8]
    return hello[:len(hello) // 2]


def test_stalled_tls_handshake_times_out():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates",
                    pki.server, "--handshake-timeout-ms", "1000", tcp=True) as srv:
            stalled = []
            # Nothing, half a ClientHello, a record that starts a 16 MiB
            # handshake message: each leaves the server waiting for more.
            for part in (b"", partial_client_hello(pki.ca_only),
                         b"\x16\x03\x01\x00\x10" + b"\xff" * 16):
                s = raw_client(srv)
                send_option(s, OPT_STARTTLS)
                assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
                s.sendall(part)
                stalled.append(s)
            for s in stalled:
                assert_closed(s, timeout=30)
                s.close()
            wait_for_log(srv, r"(?s)(handshake timed out.*){3}")
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


def flood(srv, count, payload, unix=False):
    """Sends `count` unknown options (0x1234) from a thread while reading the
    replies; returns how many came back before the server closed.

    Over TCP the count is only a bound: the server closes with our unread
    options in its receive queue, so its kernel resets the connection and may
    drop replies not yet sent. Over a unix socket every reply written before
    the close is still read."""
    if unix:
        s = srv.connect_raw()  # the unix socket
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3))
    else:
        s = raw_client(srv)
    s.settimeout(30)
    one = option_header(0x1234, payload)

    def sender():
        try:
            batch = max(1, 65536 // len(one))
            for i in range(0, count, batch):
                s.sendall(one * min(batch, count - i))
        except OSError:  # the server closed while we were still sending
            pass

    th = threading.Thread(target=sender)
    th.start()
    n = 0
    try:
        while True:
            opt, rtype, _ = read_option_reply(s)
            assert (opt, rtype) == (0x1234, ERR_UNSUP), (opt, hex(rtype))
            n += 1
            assert n <= count
    except (EOFError, ConnectionResetError):
        pass
    th.join(60)
    assert not th.is_alive()
    s.close()
    return n


def test_option_count_and_payload_caps():
    with workdir() as d:
        img = make_image(d)
        with Server(img, "--format", "raw", tcp=True) as srv:
            assert srv.sock
            n = flood(srv, 10000, b"", unix=True)
            assert n == 4096, n
            wait_for_log(srv, r"more than 4096 options in one handshake")
            n = flood(srv, 10000, b"")
            log(f"{n} replies over TCP")
            assert 1 <= n <= 4096, n
            wait_for_log(srv, r"(?s)(more than 4096 options in one handshake.*){2}")
            # 64 KiB options: the 64 MiB payload budget ends the handshake first.
            n = flood(srv, 1100, b"\0" * 65536, unix=True)
            assert n == 1024, n
            wait_for_log(srv, r"more than 67108864 bytes of option payload")
            assert_serves(srv, srv.tcp_uri, img)


def test_starttls_when_tls_off():
    with workdir() as d:
        img = make_image(d)
        with Server(img, "--format", "raw", tcp=True) as srv:
            s = raw_client(srv)
            assert final_reply(s, OPT_STARTTLS) == ERR_UNSUP
            raw_go_and_read(s, "test")  # the handshake goes on in plain text
            s.close()
            assert_connect_fails(nbds(srv))
            assert_serves(srv, srv.tcp_uri, img)


def test_second_starttls_is_invalid():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "on",
                    "--tls-certificates", pki.server, tcp=True) as srv:
            s = raw_client(srv)
            assert final_reply(s, OPT_STARTTLS, b"x") == ERR_INVALID  # STARTTLS has no payload
            # Negotiated in plain text, so forgotten once TLS is up: the read
            # below gets a simple reply.
            assert final_reply(s, OPT_STRUCTURED_REPLY) == REP_ACK
            t = start_tls(s, pki.ca_only)
            assert final_reply(t, OPT_STARTTLS) == ERR_INVALID
            assert final_reply(t, OPT_STARTTLS) == ERR_INVALID
            raw_go_and_read(t, "test")  # still a working TLS session
            t.close()
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)
            assert_serves(srv, srv.tcp_uri, img)


def test_per_listener_tls():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        sock = os.path.join(d, "plain.sock")
        conf = write_config(d, [{"name": "test", "path": img, "format": "raw"}],
                            {"mode": "require", "certificates": pki.server},
                            listeners=[{"type": "tcp", "address": "127.0.0.1", "port": 0},
                                       {"type": "unix", "path": sock, "tls": {"mode": "off"}}])
        with config_server(conf, "test") as srv:
            log_text = srv.read_log()
            assert "(TLS require)" in log_text and f"unix socket {sock} (TLS off)" in log_text
            s = raw_client(srv)
            assert final_reply(s, OPT_GO, go_data("test")) == ERR_TLS_REQD
            s.close()
            assert_serves(srv, f"nbd+unix:///test?socket={sock}", img)
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


def test_tls_priority():
    """--tls-priority is applied, and TLS below 1.2 is refused whatever it says."""
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates", pki.server,
                    "--tls-priority", "NORMAL:-VERS-TLS1.3:+VERS-TLS1.1:+VERS-TLS1.0",
                    tcp=True) as srv:
            def attempt(version, legacy=False):
                s = raw_client(srv)
                send_option(s, OPT_STARTTLS)
                assert read_option_reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
                ctx = tls_context(pki.ca_only)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    ctx.minimum_version = ctx.maximum_version = version
                if legacy:
                    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it
                try:
                    t = ctx.wrap_socket(s, server_hostname="localhost")
                except (ssl.SSLError, OSError):
                    s.close()
                    return None
                t.settimeout(10)
                return t

            t = attempt(ssl.TLSVersion.TLSv1_2)
            assert t is not None and t.version() == "TLSv1.2"
            raw_go_and_read(t, "test")
            t.close()
            wait_for_log(srv, r"TLS \(TLS1\.2\)")
            assert attempt(ssl.TLSVersion.TLSv1_3) is None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old = [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1]
            for version in old:
                assert attempt(version, legacy=True) is None, version
            # All three refusals were the server's (the client did try).
            wait_for_log(srv, r"(?s)(TLS handshake failed.*){3}")
            assert "(TLS1.1)" not in srv.read_log() and "(TLS1.0)" not in srv.read_log()
            assert_serves(srv, nbds(srv, tls_certificates=pki.ca_only), img)


# ---- 4. configuration errors ----------------------------------------------------------

def refused_start(img, *args):
    """Runs `strata serve` expecting it to refuse to start; returns its output."""
    cmd = [STRATA, "serve", img, "--format", "raw", "--export", "test", "--port", "0",
           "--bind", "127.0.0.1", *args]
    log("+", " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, timeout=30)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode != 0, out
    assert b"serving" not in p.stdout, out
    return out


def test_config_errors():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)

        made = []

        def certs_with(name, content=None):
            """A copy of the server's directory without `name`, or with
            `content` in its place."""
            made.append(name)
            dst = os.path.join(d, f"certs{len(made)}")
            os.mkdir(dst)
            for f in os.listdir(pki.server):
                if f != name:
                    with open(os.path.join(pki.server, f), "rb") as src:
                        data = src.read()
                    with open(os.path.join(dst, f), "wb") as out:
                        out.write(data)
            if content is not None:
                with open(os.path.join(dst, name), "wb") as out:
                    out.write(content)
            return dst

        no_key = certs_with("server-key.pem")
        out = refused_start(img, "--tls", "require", "--tls-certificates", no_key)
        assert os.path.join(no_key, "server-key.pem") in out, out

        junk = b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
        bad_cert = certs_with("server-cert.pem", junk)
        out = refused_start(img, "--tls", "require", "--tls-certificates", bad_cert)
        assert os.path.join(bad_cert, "server-cert.pem") in out, out

        bad_key = certs_with("server-key.pem", b"garbage\n")
        out = refused_start(img, "--tls", "require", "--tls-certificates", bad_key)
        assert "server-key.pem" in out, out

        bad_crl = certs_with("ca-crl.pem", b"-----BEGIN X509 CRL-----\nnonsense\n"
                                           b"-----END X509 CRL-----\n")
        out = refused_start(img, "--tls", "require", "--tls-certificates", bad_crl)
        assert os.path.join(bad_crl, "ca-crl.pem") in out, out

        bad_ca = certs_with("ca-cert.pem", junk)
        out = refused_start(img, "--tls", "require", "--tls-certificates", bad_ca)
        assert os.path.join(bad_ca, "ca-cert.pem") in out, out

        no_ca = certs_with("ca-cert.pem")
        out = refused_start(img, "--tls", "require", "--tls-certificates", no_ca,
                            "--tls-verify-peer")
        assert os.path.join(no_ca, "ca-cert.pem") in out, out

        # A key that cannot be read: a directory in its place (root reads any
        # file whatever its mode), and a file of mode 0 where that counts.
        dir_key = certs_with("server-key.pem")
        os.mkdir(os.path.join(dir_key, "server-key.pem"))
        out = refused_start(img, "--tls", "require", "--tls-certificates", dir_key)
        assert os.path.join(dir_key, "server-key.pem") in out, out
        if os.geteuid() != 0:
            unreadable = certs_with("server-key.pem", b"")
            os.chmod(os.path.join(unreadable, "server-key.pem"), 0)
            out = refused_start(img, "--tls", "require", "--tls-certificates", unreadable)
            assert os.path.join(unreadable, "server-key.pem") in out, out

        out = refused_start(img, "--tls", "require", "--tls-certificates",
                            os.path.join(d, "no-such-dir"))
        assert os.path.join(d, "no-such-dir") in out, out

        good = psk_lines(make_psk(os.path.join(d, "good.psk"), "alice"))[0]
        for name, text, why in (
                ("no-colon.psk", good + "\nbob\n", ":2: expected username:hexkey"),
                ("odd-hex.psk", "alice:abc\n", ":1: the key must be an even number"),
                ("not-hex.psk", "alice:zz\n", ":1: the key must be hex digits"),
                ("equals.psk", "CN=alice:" + good.split(":")[1] + "\n",
                 ":1: a PSK username must not contain '='"),
                ("empty.psk", "\n", ": holds no username:hexkey line")):
            path = os.path.join(d, name)
            with open(path, "w") as f:
                f.write(text)
            out = refused_start(img, "--tls", "require", "--tls-psk", path)
            assert path + why in out, out

        out = refused_start(img, "--tls", "require", "--tls-psk", os.path.join(d, "none.psk"))
        assert os.path.join(d, "none.psk") in out, out

        out = refused_start(img, "--tls", "require")
        assert "certificates" in out and "psk" in out, out
        out = refused_start(img, "--tls", "on")
        assert "certificates" in out and "psk" in out, out
        out = refused_start(img, "--tls-psk", os.path.join(d, "good.psk"), "--tls-verify-peer")
        assert "verify" in out, out
        conf = write_config(d, [{"name": "test", "path": img, "format": "raw"}],
                            {"mode": "sometimes", "certificates": pki.server})
        p = run([STRATA, "serve", "--config", conf], check=False, timeout=30)
        assert p.returncode != 0 and "tls.mode" in p.stdout + p.stderr, p.stdout + p.stderr


def test_bad_priority_string_is_reported():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        for bad in ("NO-SUCH-PRIORITY", "NORMAL:+NO-SUCH-CIPHER"):
            out = refused_start(img, "--tls", "require", "--tls-certificates", pki.server,
                                "--tls-priority", bad)
            assert "Sanitizer" not in out and "runtime error" not in out, out
            assert f"tls.priority: '{bad}'" in out, out
            # The message quotes where GnuTLS stopped: a part of what was given.
            given = bad + ":-VERS-SSL3.0:-VERS-TLS1.0:-VERS-TLS1.1"  # what the server passes on
            m = re.search(r"at '([^']*)'", out)
            if m:
                assert m.group(1) and m.group(1) in given, (
                    f"the error position is not part of the priority string: {m.group(1)!r}\n{out}")


# ---- 5. safe defaults -----------------------------------------------------------------

def test_default_bind_is_loopback():
    with workdir() as d:
        img = make_image(d)
        # No --bind: the TCP listener is on loopback only.
        with Server(img, "--format", "raw", "--port", "0") as srv:
            text = srv.read_log()
            m = re.search(r"listening on (\S+):(\d+) \(TLS off\)", text)
            assert m and m.group(1) == "127.0.0.1", text
            assert f"serving nbd://127.0.0.1:{m.group(2)}/test" in text, text
            assert "without TLS" not in text, text
            s = socket.create_connection(("127.0.0.1", int(m.group(2))), timeout=10)
            assert recv_exact(s, 8) == b"NBDMAGIC"
            s.close()


def test_exposed_writable_export_without_tls_warns():
    with workdir() as d:
        pki = make_pki(os.path.join(d, "pki"))
        img = make_image(d)
        with Server(img, "--format", "raw", tcp=True, bind="0.0.0.0") as srv:
            text = srv.read_log()
            assert re.search(r"warn.*listening on 0\.0\.0\.0:\d+ without TLS.*'test'.*--tls",
                             text), text
        with Server(img, "--format", "raw", "--read-only", tcp=True, bind="0.0.0.0") as srv:
            assert "without TLS" not in srv.read_log()
        with Server(img, "--format", "raw", "--tls", "require", "--tls-certificates",
                    pki.server, tcp=True, bind="0.0.0.0") as srv:
            assert "without TLS" not in srv.read_log()
        # Mode "on" lets plain clients write an export without tls_required.
        with Server(img, "--format", "raw", "--tls", "on", "--tls-certificates",
                    pki.server, tcp=True, bind="0.0.0.0") as srv:
            text = srv.read_log()
            assert re.search(r"warn.*listening on 0\.0\.0\.0:\d+ without TLS.*'test'", text), text


if __name__ == "__main__":
    main([test_x509_without_client_certificate,
          test_x509_client_certificate_with_verify_peer,
          test_psk,
          test_qemu_x509,
          test_qemu_psk,
          test_require_refuses_plain_options,
          test_wrong_ca,
          test_expired_client_certificate,
          test_revoked_client_certificate,
          test_client_without_certificate_under_verify_peer,
          test_wrong_psk_key,
          test_unknown_psk_user,
          test_allow_list_x509,
          test_allow_list_psk,
          test_selective_tls,
          test_starttls_pipelined_with_go,
          test_many_records_in_one_segment,
          test_garbage_instead_of_client_hello,
          test_stalled_tls_handshake_times_out,
          test_option_count_and_payload_caps,
          test_starttls_when_tls_off,
          test_second_starttls_is_invalid,
          test_per_listener_tls,
          test_tls_priority,
          test_config_errors,
          test_bad_priority_string_is_reported,
          test_default_bind_is_loopback,
          test_exposed_writable_export_without_tls_warns])
