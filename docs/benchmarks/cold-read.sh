#!/bin/bash
# Random 4K reads from a cold page cache: does a server keep its disk I/O
# concurrency? Drops the page cache before every run (root), then runs fio's
# nbd engine for 3 s. fio numbers only; not an nbd-bench comparison.
# Usage: cold-read.sh ROUNDS NAME "SERVER CMD with PORT" [NAME "CMD"]...
# e.g.   cold-read.sh 3 strata "build-release/strata serve --port PORT --export bench img.raw"
# Env: QD (32), JOBS (1), SIZE (1G: the region read).
set -u
rounds=$1; shift
names=(); cmds=()
while [ $# -gt 0 ]; do names+=("$1"); cmds+=("$2"); shift 2; done
for r in $(seq "$rounds"); do
  for i in "${!names[@]}"; do
    port=$((12200 + i)); cmd=${cmds[$i]//PORT/$port}
    $cmd > /dev/null 2>&1 & pid=$!
    sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.5
    out=$(fio --name=r --ioengine=nbd --uri=nbd://127.0.0.1:$port/bench --rw=randread --bs=4k \
      --iodepth="${QD:-32}" --numjobs="${JOBS:-1}" --size="${SIZE:-1G}" --runtime=3 --time_based \
      --norandommap --group_reporting --output-format=json 2>/dev/null)
    kill $pid; wait $pid 2>/dev/null
    echo "$out" | python3 -c "
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index('{'):])['jobs'][0]
print('${names[$i]}', int(j['read']['iops']), 'IOPS')"
  done
done
