"""fio's nbd engine writes and verifies with crc32c."""
import os

from strata_test import Server, main, run, workdir


def test_fio_verify_crc32c():
    with workdir() as d:
        img = os.path.join(d, "disk.raw")
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        with Server(img, "--format", "raw", tcp=True) as srv:
            out = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}",
                       "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M",
                       "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                       "--output-format=json"], cwd=d).stdout  # fio leaves state files in its cwd
            import json
            job = json.loads(out[out.index("{"):])["jobs"][0]
            assert job["error"] == 0, job["error"]
            assert job["write"]["io_bytes"] >= 16 << 20, job["write"]["io_bytes"]
            assert job["read"]["io_bytes"] >= 16 << 20, job["read"]["io_bytes"]  # verify pass
            out = run(["fio", "--name=seq", "--ioengine=nbd", f"--uri={srv.tcp_uri}",
                       "--rw=write", "--bs=1M", "--iodepth=8", "--size=32M",
                       "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"], cwd=d).stdout
            assert "err= 0" in out, out


if __name__ == "__main__":
    main([test_fio_verify_crc32c])
