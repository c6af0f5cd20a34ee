#!/usr/bin/env python3
"""Prints medians, ranges and paired ratios (A / B inside each round) from the bench CSV."""
import csv
import statistics
import sys
from collections import defaultdict

path, a, b = sys.argv[1:4]
cells = defaultdict(dict)  # (test, metric) -> {(server, rep): value}
for row in csv.DictReader(open(path)):
    cells[(row["test"], row["metric"])][(row["server"], row["rep"])] = float(row["value"])


def show(test, metric, label):
    values = cells.get((test, metric), {})
    out = [f"{test:8s} {label:11s}"]
    for server in (a, b):
        got = [v for (s, _), v in values.items() if s == server]
        if got:
            out.append(f"{server} {statistics.median(got):9.1f} [{min(got):.1f}-{max(got):.1f}]")
        else:
            out.append(f"{server} {'n/a':>9s}")
    reps = sorted({r for (_, r) in values})
    ratios = [values[(a, r)] / values[(b, r)] for r in reps if (a, r) in values and (b, r) in values and values[(b, r)]]
    if ratios:
        out.append(f"{a}/{b} x{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} rounds")
    else:
        out.append("ratio n/a (a server produced no numbers)")
    print("  ".join(out))


tests = sorted({t for (t, _) in cells})
for test in tests:
    show(test, "MiB/s", "MiB/s")
    show(test, "IOPS", "IOPS")
    show(test, "server_cpu", "server CPU%")
    show(test, "foreign_cpu", "others CPU%")
