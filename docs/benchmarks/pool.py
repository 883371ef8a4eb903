#!/usr/bin/env python3
"""Pooled medians of several nbd-bench runs (results.json files).

Usage: pool.py BASELINE RESULTS.json [RESULTS.json ...]
Prints, per workload, each server's median IOPS over the clean runs of every
file, divided by BASELINE's. nbd-bench's own report does this for one file.
"""
import collections
import json
import statistics
import sys

base, paths = sys.argv[1], sys.argv[2:]
iops = collections.defaultdict(list)
order = []
for p in paths:
    for r in json.load(open(p))["results"]:
        if r.get("noisy") or r.get("fio_error") or not r.get("iops"):
            continue
        iops[(r["workload"], r["server"])].append(r["iops"])
        if r["workload"] not in order:
            order.append(r["workload"])
servers = sorted({s for (_, s) in iops})
print("| server | " + " | ".join(order) + " |")
print("|---" * (len(order) + 1) + "|")
for s in servers:
    cells = []
    for w in order:
        if (w, s) in iops and (w, base) in iops:
            ratio = statistics.median(iops[(w, s)]) / statistics.median(iops[(w, base)])
            cells.append(f"{ratio:.2f} (n={len(iops[(w, s)])})")
        else:
            cells.append("-")
    print(f"| {s} | " + " | ".join(cells) + " |")
