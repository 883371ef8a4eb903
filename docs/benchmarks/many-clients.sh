#!/bin/bash
# Many clients: random 4K reads from N fio jobs (one NBD connection each, QD8,
# as nbd-bench's conn-16) against one server, for N = 16 and 64, with the
# server's thread count sampled in the middle of each run and its peak RSS.
# Usage: many-clients.sh IMAGE STRATA_BINARY [ROUNDS]
set -u
img=$1 strata=$2 rounds=${3:-3}
port=10899
start() {
  case $1 in
    strata) "$strata" serve "$img" --format raw --export bench --port $port --bind 127.0.0.1 --log-level warn & ;;
    nbdkit) nbdkit -f -i 127.0.0.1 -p $port --exportname bench file "$img" & ;;
  esac
  pid=$!
  for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$port/bench >/dev/null 2>&1 && return; sleep 0.1; done
}
for r in $(seq "$rounds"); do
  for s in strata nbdkit; do
    for n in 16 64; do
      start $s
      ( sleep 2.5; grep Threads /proc/$pid/status > /tmp/many-threads ) &
      sampler=$!
      iops=$(fio --name=m --ioengine=nbd --uri=nbd://127.0.0.1:$port/bench --rw=randread --bs=4k \
        --iodepth=8 --numjobs=$n --size=512M --norandommap --runtime=5 --time_based --group_reporting 2>&1 |
        grep -oE 'IOPS=[0-9.k]+' | head -1)
      wait $sampler
      rss=$(grep VmHWM /proc/$pid/status | awk '{print $2}')
      kill $pid; wait $pid 2>/dev/null
      echo "round=$r server=$s clients=$n $iops threads=$(awk '{print $2}' /tmp/many-threads) peak_rss_kib=$rss"
    done
  done
done
