#!/bin/bash
# Context switches and CPU per I/O of a server and of fio during one 4-second
# 4K random-read run (4 connections x QD16 by default), from /proc counters
# sampled 3.5 s in. fio numbers only; not an nbd-bench comparison.
# Usage: switch-probe.sh "SERVER CMD with PORT" [JOBS] [QD] [RW]
set -u
cmd=${1//PORT/12012}; jobs=${2:-4}; qd=${3:-16}; rw=${4:-randread}
$cmd > /dev/null 2>&1 & pid=$!
sleep 0.7
fio --name=r --ioengine=nbd --uri=nbd://127.0.0.1:12012/bench --rw="$rw" --bs=4k --iodepth="$qd" \
  --numjobs="$jobs" --size=512M --runtime=4 --time_based --norandommap --group_reporting \
  --output-format=json > /tmp/switch-probe.json 2>/dev/null & fpid=$!
sleep 3.5
sum() { awk "$1" "${@:2}" 2>/dev/null; }
cs=$(sum '/ctxt_switches/ {s+=$2} END {print s+0}' /proc/$pid/task/*/status)
st=$(sum '{s+=$14+$15} END {print s+0}' /proc/$pid/task/*/stat)
fcs=0; fst=0
for p in $(pgrep -f "fio --name=r"); do
  fcs=$((fcs + $(sum '/ctxt_switches/ {s+=$2} END {print s+0}' /proc/$p/task/*/status)))
  fst=$((fst + $(sum '{s+=$14+$15} END {print s+0}' /proc/$p/task/*/stat)))
done
wait $fpid; kill $pid; wait $pid 2>/dev/null
python3 - "$cs" "$st" "$fcs" "$fst" <<'PY'
import json, os, sys
t = open('/tmp/switch-probe.json').read(); j = json.loads(t[t.index('{'):])['jobs'][0]
io = (j['read']['total_ios'] + j['write']['total_ios']) * 3.5 / 4
hz = os.sysconf('SC_CLK_TCK')
cs, st, fcs, fst = (float(x) for x in sys.argv[1:])
print('iops=%d server: switches/io=%.2f cpu_us/io=%.1f  fio: switches/io=%.2f cpu_us/io=%.1f' % (
    j['read']['iops'] + j['write']['iops'], cs / io, st * 1e6 / hz / io, fcs / io, fst * 1e6 / hz / io))
PY
