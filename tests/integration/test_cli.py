"""The command line: every option takes exactly one value (repeat it for more),
so an image after a list option is never taken for one of its values, and
`serve` falls back to the embedded default export only when neither an image
nor a config is given, and says so."""
import json
import os

from strata_test import STRATA, Server, main, nbd_handle, run, workdir

MiB = 1 << 20


def raw_image(path, size, fill):
    with open(path, "wb") as f:
        f.write(fill * size)


def test_image_after_allowed_dir_is_the_image():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        raw_image(img, MiB, b"\x42")
        with Server("--allowed-dir", d, img, "--format", "raw", cwd=d) as srv:
            h = nbd_handle(srv.uri)
            assert h.get_size() == MiB
            assert h.pread(4096, 0) == b"\x42" * 4096
            h.shutdown()
        assert "embedded default" not in srv.log_text, srv.log_text
        assert not os.path.exists(os.path.join(d, "data")), "the default export was created"


def test_repeated_allowed_dir_confines_children_to_all_of_them():
    with workdir() as d:
        base_dir = os.path.join(d, "base")
        top_dir = os.path.join(d, "top")
        os.makedirs(base_dir)
        os.makedirs(top_dir)
        base = os.path.join(base_dir, "base.raw")
        raw_image(base, MiB, b"\x11")
        top = os.path.join(top_dir, "top.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top])
        with Server("--allowed-dir", top_dir, "--allowed-dir", base_dir, top) as srv:
            h = nbd_handle(srv.uri)
            assert h.pread(4096, 0) == b"\x11" * 4096  # the backing file was allowed
            h.shutdown()
        # Only the first directory: the backing file is refused.
        srv = Server("--allowed-dir", top_dir, top, expect_fail=True)
        srv.start()
        assert srv.proc.wait(timeout=30) != 0
        assert "base.raw" in srv.stop(check=False)


def test_repeated_socket_listens_on_each():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        raw_image(img, MiB, b"\x07")
        extra = os.path.join(d, "second.sock")
        with Server("--socket", extra, img) as srv:  # the image after a list option
            for uri in (srv.uri, f"nbd+unix:///{srv.export}?socket={extra}"):
                h = nbd_handle(uri)
                assert h.get_size() == MiB
                h.shutdown()


def test_two_images_are_refused():
    with workdir() as d:
        a = os.path.join(d, "a.raw")
        b = os.path.join(d, "b.raw")
        raw_image(a, MiB, b"\x01")
        raw_image(b, MiB, b"\x02")
        p = run([STRATA, "serve", "--socket", os.path.join(d, "s"), a, b], check=False, cwd=d)
        assert p.returncode != 0
        assert "b.raw" in p.stderr + p.stdout, p.stderr
        assert not os.path.exists(os.path.join(d, "data")), "the default export was created"
        # The same trap in the image tools: the image is not a second directory.
        p = run([STRATA, "info", "--allowed-dir", d, a], cwd=d)
        assert "a.raw" in p.stdout


def test_embedded_default_only_without_image_and_config_and_logged():
    with workdir() as d:
        default = os.path.join(d, "data", "default.raw")
        for first in (True, False):
            with Server(export="default", cwd=d) as srv:
                h = nbd_handle(srv.uri)
                assert h.get_size() == 1 << 30
                h.shutdown()
            text = srv.log_text
            assert "no IMAGE and no --config given" in text, text
            assert ("created and serving" in text) == first, text
            assert os.path.getsize(default) == 1 << 30


def test_bitmap_the_image_lacks_stops_the_start_naming_export_and_bitmap():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        raw_image(img, MiB, b"\x00")
        p = run([STRATA, "serve", "--socket", os.path.join(d, "s"), "--export", "vm1",
                 "--bitmap", "backup-0", img], check=False, cwd=d)
        assert p.returncode != 0
        out = p.stderr + p.stdout
        assert "export 'vm1': bitmap 'backup-0'" in out and "it has none" in out, out
        # --bitmap is for IMAGE; a config lists them in the export.
        cfg = os.path.join(d, "strata.json")
        with open(cfg, "w") as f:
            f.write('{"exports": [{"name": "vm1", "path": "%s"}]}' % img)
        p = run([STRATA, "serve", "--config", cfg, "--bitmap", "backup-0"], check=False, cwd=d)
        assert p.returncode != 0
        assert "--bitmap" in p.stderr + p.stdout, p.stderr


def test_image_without_bitmaps_lists_none_and_empty_bitmaps_is_accepted():
    import nbd
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        raw_image(img, MiB, b"\x00")
        sock = os.path.join(d, "s.sock")
        cfg = os.path.join(d, "strata.json")
        with open(cfg, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": sock}],
                       "exports": [{"name": "vm1", "path": img, "bitmaps": []}]}, f)
        srv = Server(config=cfg)
        srv.sock = sock
        with srv:
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.connect_uri(f"nbd+unix:///vm1?socket={sock}")
            names = []
            h.opt_list_meta_context(lambda name: names.append(name) or 0)
            h.add_meta_context("qemu:dirty-bitmap:")  # the query of the next LIST
            queried = []
            h.opt_list_meta_context(lambda name: queried.append(name) or 0)
            h.opt_abort()
            assert "base:allocation" in names and "qemu:allocation-depth" in names, names
            assert not any(n.startswith("qemu:dirty-bitmap:") for n in names), names
            assert queried == [], queried


if __name__ == "__main__":
    main([test_image_after_allowed_dir_is_the_image,
          test_repeated_allowed_dir_confines_children_to_all_of_them,
          test_repeated_socket_listens_on_each, test_two_images_are_refused,
          test_embedded_default_only_without_image_and_config_and_logged,
          test_bitmap_the_image_lacks_stops_the_start_naming_export_and_bitmap,
          test_image_without_bitmaps_lists_none_and_empty_bitmaps_is_accepted])
