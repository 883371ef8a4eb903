"""Unix listener "mode" and "group": the socket gets them right after bind, a
client of another uid in that group connects (nbdinfo), one outside it is
refused by the kernel; an unknown group or one the server's user is not in
stops the server with a message that says so."""
import grp
import json
import os
import stat

from strata_test import STRATA, Server, main, run, sparse_image, workdir

# Ids no account on a test machine uses: the kernel only compares numbers.
OTHER_UID = 54322
SHARED_GID = 54321


def config_for(srv, d, **listener):
    conf = os.path.join(d, "strata.json")
    with open(conf, "w") as f:
        json.dump({"listeners": [dict(type="unix", path=srv.sock, **listener)],
                   "exports": [{"name": "test", "path": sparse_image(d)}]}, f)
    return conf


def server_with(d, **listener):
    srv = Server(config=os.path.join(d, "strata.json"))
    config_for(srv, d, **listener)
    return srv


def as_user(uid, groups):
    """preexec_fn: the child runs as uid with exactly these groups."""
    def drop():
        os.setgroups(groups)
        os.setgid(groups[0] if groups else uid)
        os.setuid(uid)
    return drop


def nbdinfo_size_as(uid, groups, uri):
    return run(["nbdinfo", "--size", uri], check=False, preexec_fn=as_user(uid, groups))


def socket_stat(srv):
    st = os.stat(srv.sock)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_mode_and_numeric_group_are_applied():
    with workdir() as d:
        srv = server_with(d, mode="0660", group=str(SHARED_GID))
        with srv:
            assert socket_stat(srv) == (0o660, SHARED_GID)
            assert "mode 0660, gid 54321" in srv.read_log()
            if os.geteuid() != 0:
                return  # connecting as other uids needs root
            os.chmod(srv.tmp, 0o755)  # the socket's directory is not what is tested
            ok = nbdinfo_size_as(OTHER_UID, [SHARED_GID], srv.uri)
            assert ok.returncode == 0 and int(ok.stdout) == 1 << 20, ok.stderr
            refused = nbdinfo_size_as(OTHER_UID, [OTHER_UID], srv.uri)
            assert refused.returncode != 0
            assert "Permission denied" in refused.stderr, refused.stderr


def test_mode_alone_and_group_by_name():
    with workdir() as d:
        srv = server_with(d, mode="0600")
        with srv:
            assert socket_stat(srv) == (0o600, os.getegid())
    named = next((g for g in grp.getgrall() if g.gr_gid != os.getegid()), None)
    if named is None or os.geteuid() != 0:
        return  # giving a socket to a group one is not in needs root
    with workdir() as d:
        srv = server_with(d, group=named.gr_name)
        with srv:
            # Without "mode" the socket is owner-only until chmod: 0700 & ~0177.
            assert socket_stat(srv) == (0o600, named.gr_gid)


def test_unknown_group_stops_the_server():
    with workdir() as d:
        srv = server_with(d, group="no-such-group-strata")
        p = run([STRATA, "serve", "--config", os.path.join(d, "strata.json")], check=False)
        assert p.returncode == 1
        assert "group 'no-such-group-strata' is not known" in p.stderr, p.stderr
        assert not os.path.exists(srv.sock), "the socket was left behind"


def test_group_the_user_is_not_in_says_how_to_fix_it():
    if os.geteuid() != 0:
        return  # needs a user without CAP_CHOWN, made by dropping root's
    with workdir() as d:
        os.chmod(d, 0o777)
        srv = server_with(d, mode="0660", group=str(SHARED_GID))
        for path in (srv.tmp, os.path.join(d, "disk.raw")):
            os.chown(path, OTHER_UID, OTHER_UID)
        p = run([STRATA, "serve", "--config", os.path.join(d, "strata.json")], check=False,
                preexec_fn=as_user(OTHER_UID, [OTHER_UID]))
        assert p.returncode == 1
        assert f"cannot give unix socket {srv.sock} to group '{SHARED_GID}'" in p.stderr, p.stderr
        assert "must be a member of that group" in p.stderr, p.stderr
        assert not os.path.exists(srv.sock), "the socket was left behind"


def test_bad_mode_is_a_config_error():
    with workdir() as d:
        server_with(d, mode="4777")
        p = run([STRATA, "serve", "--config", os.path.join(d, "strata.json")], check=False)
        assert p.returncode == 1
        assert "listeners[0].mode: '4777' sets set-id or sticky bits" in p.stderr, p.stderr


if __name__ == "__main__":
    main([test_mode_and_numeric_group_are_applied,
          test_mode_alone_and_group_by_name,
          test_unknown_group_stops_the_server,
          test_group_the_user_is_not_in_says_how_to_fix_it,
          test_bad_mode_is_a_config_error])
