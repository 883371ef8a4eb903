"""Image locks: an image written through one export is never opened by another
export or Strata process, a parent or backing file in use as a read-only layer
is never opened read-write, read-only sharing works, and the image tool says
why it cannot look at an image in use (and looks anyway with -U)."""
import json
import os
import subprocess

from strata_test import STRATA, Server, main, run, sparse_image, workdir

SIZE = 4 << 20


def raw_image(d, name="disk.raw"):
    return sparse_image(d, name, SIZE)


def start_fails(*args):
    p = subprocess.run([STRATA, "serve", *args], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_two_exports_of_one_image_are_refused():
    with workdir() as d:
        img = raw_image(d)
        conf = os.path.join(d, "c.json")
        with open(conf, "w") as f:
            json.dump({"listeners": [{"type": "unix", "path": os.path.join(d, "s.sock")}],
                       "exports": [{"name": "a", "path": img, "format": "raw"},
                                   {"name": "b", "path": img, "format": "raw"}]}, f)
        out = start_fails("--config", conf)
        assert "in use" in out and img in out, out


def test_second_process_is_refused_until_the_first_stops():
    with workdir() as d:
        img = raw_image(d)
        with Server(img, "--format", "raw"):
            sock = os.path.join(d, "other.sock")
            out = start_fails(img, "--format", "raw", "--socket", sock)
            assert "in use" in out and img in out, out
            out = start_fails(img, "--format", "raw", "--read-only", "--socket", sock)
            assert "in use" in out and "read-write" in out, out
        with Server(img, "--format", "raw") as srv:
            assert int(run(["nbdinfo", "--size", srv.uri]).stdout) == SIZE


def test_read_only_exports_share_an_image():
    with workdir() as d:
        img = raw_image(d)
        with Server(img, "--format", "raw", "--read-only") as a, \
                Server(img, "--format", "raw", "--read-only") as b:
            for srv in (a, b):
                assert int(run(["nbdinfo", "--size", srv.uri]).stdout) == SIZE


def test_parent_in_use_read_write_is_not_opened_as_a_parent():
    with workdir() as d:
        base = os.path.join(d, "base.vhd")
        child = os.path.join(d, "child.vhd")
        run([STRATA, "create", "-f", "vhd", base, "8M"])
        run([STRATA, "create", "-f", "vhd", "-b", "base.vhd", child], cwd=d)
        with Server(base, "--format", "vhd"):
            out = start_fails(child, "--format", "vhd", "--socket", os.path.join(d, "c.sock"))
            assert "in use" in out and "base.vhd" in out, out
        # Parent served read-only by one process, child read-write by another: fine,
        # and the parent stays locked against writers while the child is served.
        with Server(base, "--format", "vhd", "--read-only"), Server(child, "--format", "vhd"):
            out = start_fails(base, "--format", "vhd", "--socket", os.path.join(d, "b.sock"))
            assert "in use" in out, out


def test_tool_needs_force_share_for_an_image_in_use():
    with workdir() as d:
        img = raw_image(d)
        with Server(img, "--format", "raw"):
            p = run([STRATA, "info", img], check=False)
            assert p.returncode != 0 and "in use" in p.stdout + p.stderr, p.stdout + p.stderr
            info = json.loads(run([STRATA, "info", "-U", "--output=json", img]).stdout)
            assert info["virtual-size"] == SIZE, info
        run([STRATA, "info", img])


if __name__ == "__main__":
    main([test_two_exports_of_one_image_are_refused,
          test_second_process_is_refused_until_the_first_stops,
          test_read_only_exports_share_an_image,
          test_parent_in_use_read_write_is_not_opened_as_a_parent,
          test_tool_needs_force_share_for_an_image_in_use])
