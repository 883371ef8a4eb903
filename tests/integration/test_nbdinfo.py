"""nbdinfo (libnbd) sees the size, flags, block sizes and the export list."""
import json
import os

from strata_test import Server, main, run, workdir


def test_json_shows_size_flags_block_sizes():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        with Server(img, "--format", "raw", "--description", "test disk", tcp=True) as srv:
            info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
            e = info["exports"][0]
            assert info["protocol"] == "newstyle-fixed"
            assert info["structured"] is True
            assert e["export-size"] == 64 << 20
            assert e["is_read_only"] is False
            for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                         "can_multi_conn", "can_cache", "can_df"):
                assert e[flag] is True, flag
            assert e["block_size_minimum"] == 1
            assert e["block_size_preferred"] == 4096
            assert e["block_size_maximum"] == 32 << 20
            assert "base:allocation" in e["contexts"]
            assert "qemu:allocation-depth" in e["contexts"]
            assert e.get("description") == "test disk"
            # The same over TCP.
            info = json.loads(run(["nbdinfo", "--json", srv.tcp_uri]).stdout)
            assert info["exports"][0]["export-size"] == 64 << 20


def test_read_only_export_flags():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        with Server(img, "--read-only") as srv:
            e = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
            assert e["is_read_only"] is True
            assert e["can_trim"] is False
            assert e["can_zero"] is False


def test_list_shows_every_export():
    with workdir() as d:
        for n in ("a", "b"):
            with open(os.path.join(d, n + ".raw"), "wb") as f:
                f.truncate(1 << 20)
        sock = os.path.join(d, "s.sock")
        conf = os.path.join(d, "strata.json")
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": sock}],
                       "exports": [
                           {"name": "alpha", "path": os.path.join(d, "a.raw"), "format": "raw",
                            "description": "first"},
                           {"name": "beta", "path": os.path.join(d, "b.raw"), "format": "raw",
                            "read_only": True}]}, f)
        srv = Server(config=conf)
        srv.sock = sock
        with srv:
            info = json.loads(run(["nbdinfo", "--list", "--json",
                                   f"nbd+unix:///?socket={sock}"]).stdout)
            names = sorted(e["export-name"] for e in info["exports"])
            assert names == ["alpha", "beta"], names
            beta = [e for e in info["exports"] if e["export-name"] == "beta"][0]
            assert beta["is_read_only"] is True


def test_ipv6_listener():
    import socket
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        print("no IPv6 loopback here; skipping")
        return
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(1 << 20)
        with Server(img, unix=False, tcp=True, bind="::1") as srv:
            out = run(["nbdinfo", "--size", srv.tcp_uri]).stdout
            assert int(out) == 1 << 20


if __name__ == "__main__":
    main([test_json_shows_size_flags_block_sizes, test_read_only_export_flags,
          test_list_shows_every_export, test_ipv6_listener])
