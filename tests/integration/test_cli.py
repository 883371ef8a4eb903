"""The command line: every option takes exactly one value (repeat it for more),
so an image after a list option is never taken for one of its values, and
`serve` falls back to the embedded default export only when neither an image
nor a config is given, and says so."""
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


if __name__ == "__main__":
    main([test_image_after_allowed_dir_is_the_image,
          test_repeated_allowed_dir_confines_children_to_all_of_them,
          test_repeated_socket_listens_on_each, test_two_images_are_refused,
          test_embedded_default_only_without_image_and_config_and_logged])
