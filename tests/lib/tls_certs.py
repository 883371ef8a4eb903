"""Throw-away TLS credentials for the TLS tests, made with certtool and psktool
(gnutls-bin), in the directory layouts the server, libnbd and qemu read.

make_pki(root) writes, under root:
  server/         ca-cert.pem server-cert.pem server-key.pem   (--tls-certificates)
  client/         ca-cert.pem client-cert.pem client-key.pem   (a client with a certificate)
  ca-only/        ca-cert.pem                                  (a client without one)
  expired/        ca-cert.pem + an expired client certificate of the same CA
  other-ca/       ca-cert.pem of an unrelated CA (a client that trusts the wrong CA)
  other-client/   ca-cert.pem (the right CA) + a client certificate of the unrelated CA
  revoked/        ca-cert.pem + a client certificate of the CA that server-crl/ revokes
  server-crl/     server/ plus ca-crl.pem, the CA's list revoking that certificate
and returns a Pki with those directories and the client certificates' subject DNs.
Keys are ECDSA P-256 (fast to make); certificates of the good CA start a day in
the past. These keys are for tests only.
"""
import datetime
import os
import shutil
import subprocess


class Pki:
    pass


def _run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def _date(days_from_now):
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days_from_now)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _key(path):
    _run(["certtool", "--generate-privkey", "--key-type=ecdsa", "--outfile", path])
    os.chmod(path, 0o600)


def _template(path, lines, start=-1, end=30):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.write(f'activation_date = "{_date(start)}"\n')
        f.write(f'expiration_date = "{_date(end)}"\n')


def _ca(work, name, cn, serial):
    key = os.path.join(work, name + "-key.pem")
    cert = os.path.join(work, name + "-cert.pem")
    tmpl = os.path.join(work, name + ".tmpl")
    _key(key)
    _template(tmpl, [f'cn = "{cn}"', 'organization = "Strata tests"', f"serial = {serial}",
                     "ca", "cert_signing_key", "crl_signing_key"])
    _run(["certtool", "--generate-self-signed", "--load-privkey", key, "--template", tmpl,
          "--outfile", cert])
    return key, cert


def _issue(work, name, ca, lines, serial, start=-1, end=30):
    ca_key, ca_cert = ca
    key = os.path.join(work, name + "-key.pem")
    cert = os.path.join(work, name + "-cert.pem")
    tmpl = os.path.join(work, name + ".tmpl")
    _key(key)
    _template(tmpl, lines + [f"serial = {serial}"], start, end)
    _run(["certtool", "--generate-certificate", "--load-privkey", key,
          "--load-ca-certificate", ca_cert, "--load-ca-privkey", ca_key,
          "--template", tmpl, "--outfile", cert])
    return key, cert


def subject_dn(cert):
    """The certificate's subject DN as GnuTLS prints it (RFC 4514)."""
    out = _run(["certtool", "--certificate-info", "--infile", cert])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Subject: "):
            return line[len("Subject: "):]
    raise AssertionError("no Subject in certtool output:\n" + out)


def _install(dst, files):
    os.makedirs(dst, exist_ok=True)
    for src, name in files:
        shutil.copyfile(src, os.path.join(dst, name))
        os.chmod(os.path.join(dst, name), 0o600 if name.endswith("-key.pem") else 0o644)
    return dst


def make_pki(root):
    work = os.path.join(root, "work")
    os.makedirs(work)
    ca = _ca(work, "ca", "Strata test CA", 1)
    other = _ca(work, "other-ca", "Unrelated test CA", 1)
    server = _issue(work, "server", ca, [
        'cn = "localhost"', 'organization = "Strata tests"', 'dns_name = "localhost"',
        'ip_address = "127.0.0.1"', "tls_www_server", "signing_key", "encryption_key"], 2)
    client_lines = ['cn = "client"', 'organization = "Strata tests"', "tls_www_client",
                    "signing_key"]
    client = _issue(work, "client", ca, client_lines, 3)
    expired = _issue(work, "expired", ca, client_lines, 4, start=-20, end=-10)
    stranger = _issue(work, "stranger", other, client_lines, 2)
    revoked = _issue(work, "revoked", ca, client_lines, 5)
    crl_tmpl = os.path.join(work, "crl.tmpl")
    with open(crl_tmpl, "w") as f:
        f.write("crl_next_update = 30\ncrl_number = 1\n")
    crl = os.path.join(work, "ca-crl.pem")
    _run(["certtool", "--generate-crl", "--load-ca-privkey", ca[0], "--load-ca-certificate",
          ca[1], "--load-certificate", revoked[1], "--template", crl_tmpl, "--outfile", crl])

    p = Pki()
    p.ca_cert = ca[1]
    p.server = _install(os.path.join(root, "server"), [
        (ca[1], "ca-cert.pem"), (server[1], "server-cert.pem"), (server[0], "server-key.pem")])
    p.client = _install(os.path.join(root, "client"), [
        (ca[1], "ca-cert.pem"), (client[1], "client-cert.pem"), (client[0], "client-key.pem")])
    p.ca_only = _install(os.path.join(root, "ca-only"), [(ca[1], "ca-cert.pem")])
    p.expired = _install(os.path.join(root, "expired"), [
        (ca[1], "ca-cert.pem"), (expired[1], "client-cert.pem"), (expired[0], "client-key.pem")])
    p.other_ca = _install(os.path.join(root, "other-ca"), [(other[1], "ca-cert.pem")])
    p.other_client = _install(os.path.join(root, "other-client"), [
        (ca[1], "ca-cert.pem"), (stranger[1], "client-cert.pem"),
        (stranger[0], "client-key.pem")])
    p.revoked = _install(os.path.join(root, "revoked"), [
        (ca[1], "ca-cert.pem"), (revoked[1], "client-cert.pem"), (revoked[0], "client-key.pem")])
    p.server_crl = _install(os.path.join(root, "server-crl"), [
        (ca[1], "ca-cert.pem"), (server[1], "server-cert.pem"), (server[0], "server-key.pem"),
        (crl, "ca-crl.pem")])
    p.client_dn = subject_dn(client[1])
    shutil.rmtree(work)
    return p


def make_psk(path, username):
    """A psktool key file with one user; returns the path."""
    _run(["psktool", "-u", username, "-p", path])
    return path


def psk_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]
