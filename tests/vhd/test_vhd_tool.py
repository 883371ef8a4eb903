"""The image tool on VHD: `strata create/info/check/map`, cross-checked with
qemu-img (fixed/dynamic) and libvhdi's vhdiinfo (all three types)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from strata_test import STRATA, main, run, workdir  # noqa: E402
import vhdread  # noqa: E402


def info(path):
    return json.loads(run([STRATA, "info", "--output=json", path]).stdout)


def test_created_images_open_in_other_tools():
    with workdir() as d:
        fixed = os.path.join(d, "f.vhd")
        dyn = os.path.join(d, "d.vhd")
        diff = os.path.join(d, "c.vhd")
        run([STRATA, "create", "-f", "vhd", "-o", "type=fixed", fixed, "30M"])
        run([STRATA, "create", "-f", "vpc", "-o", "subformat=dynamic,block_size=1M", dyn, "30M"])
        run([STRATA, "create", "-f", "vhd", "-b", "d.vhd", "-F", "vhd", diff])
        for img in (fixed, dyn):
            q = json.loads(run(["qemu-img", "info", "-f", "vpc", "--output=json", img]).stdout)
            assert q["virtual-size"] == info(img)["virtual-size"], img
            run(["qemu-img", "compare", "-f", "vpc", "-F", "vpc", fixed, dyn])
        for img in (fixed, dyn, diff):
            out = run(["vhdiinfo", img]).stdout
            assert "Format" in out or "format" in out, out
        out = run(["vhdiinfo", diff]).stdout
        assert "Differential" in out or "differential" in out.lower(), out
        assert "d.vhd" in out, out
        j = info(diff)
        assert j["format"] == "vhd"
        fs = j["format-specific"]
        assert fs["subformat"] == "differencing"
        assert fs["parent-id"] == j["parent"]["format-specific"]["unique-id"]
        assert j["parent"]["filename"] == os.path.realpath(dyn)
        assert j["parent"]["format-specific"]["block-size"] == 1024 * 1024
        assert len(fs["parent-locators"]) == 3
        # The on-disk bytes agree with an independent parser.
        v = vhdread.Vhd(diff, parent=vhdread.Vhd(dyn))
        assert v.type == 4 and v.block_size == 2 * 1024 * 1024
        assert v.size == j["virtual-size"]


def test_create_refusals_name_the_option():
    with workdir() as d:
        img = os.path.join(d, "x.vhd")
        for opts, extra, word in (("type=floppy", [], "type"),
                                  ("block_size=3000", [], "block_size"),
                                  ("colour=red", [], "colour"),
                                  ("type=dynamic", ["-b", "nothere.vhd"], "differencing")):
            p = run([STRATA, "create", "-f", "vhd", "-o", opts] + extra + [img, "4M"], check=False)
            assert p.returncode != 0, opts
            assert word in p.stderr + p.stdout, (opts, p.stderr)
        p = run([STRATA, "create", "-f", "vhd", "-b", "nothere.vhd", img], check=False)
        assert p.returncode != 0 and "nothere.vhd" in p.stderr + p.stdout


def test_check_finds_leaks_and_errors():
    with workdir() as d:
        img = os.path.join(d, "d.vhd")
        run([STRATA, "create", "-f", "vhd", img, "8M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 4k", img])
        run([STRATA, "check", img])
        data = open(img, "rb").read()
        # 1 MiB nobody references, before the trailing footer: a leak.
        with open(img, "wb") as f:
            f.write(data[:-512] + bytes(1024 * 1024) + data[-512:])
        p = run([STRATA, "check", img], check=False)
        assert p.returncode == 3, p.stdout
        assert "unreferenced" in p.stdout, p.stdout
        # A damaged footer copy at offset 0 is corruption.
        with open(img, "r+b") as f:
            f.write(b"xxxxxxxx")
        p = run([STRATA, "check", img], check=False)
        assert p.returncode == 2, p.stdout
        assert "offset 0" in p.stdout, p.stdout


def test_map_shows_layers():
    with workdir() as d:
        base = os.path.join(d, "b.vhd")
        child = os.path.join(d, "c.vhd")
        run([STRATA, "create", "-f", "vhd", "-o", "force_size=on", base, "8M"])
        run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 2M", base])
        run([STRATA, "create", "-f", "vhd", "-o", "block_size=1M", "-b", "b.vhd", child])
        m = json.loads(run([STRATA, "map", "--output=json", child]).stdout)
        assert m[0] == {"start": 0, "length": 2 * 1024 * 1024, "depth": 2, "present": True,
                        "zero": False, "data": True, "file": os.path.realpath(base)}, m
        assert m[1]["depth"] == 0 and not m[1]["present"], m
        assert sum(e["length"] for e in m) == 8 * 1024 * 1024


if __name__ == "__main__":
    main([test_created_images_open_in_other_tools, test_create_refusals_name_the_option,
          test_check_finds_leaks_and_errors, test_map_shows_layers])
