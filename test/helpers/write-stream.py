#!/usr/bin/python3
"""
A guest-like write stream for the daemon tests, through libnbd (python3-libnbd).

    write-stream.py URI STOP_FILE SLOTS BLOCK

Keeps 8 writes in flight on one connection: write k fills slot k % SLOTS (BLOCK bytes
at slot * BLOCK) with k as a little-endian u64, repeated, so writes to one slot overlap
and the last one submitted must be what the disk holds. Prints the number of completed
writes after each completion; once STOP_FILE exists it drains, flushes and prints one
JSON line: {"last": {slot: k}, "submitted": n, "completed": n}. A failed write exits 1.
"""
import json
import os
import sys

import nbd

uri, stop_file, slots, block = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
QUEUE_DEPTH = 8

h = nbd.NBD()
h.connect_uri(uri)
in_flight = {}  # cookie -> buffer (kept alive until the write completes)
last = {}
submitted = completed = 0
while True:
    stopping = os.path.exists(stop_file)
    while not stopping and len(in_flight) < QUEUE_DEPTH:
        slot = submitted % slots
        buf = nbd.Buffer.from_bytearray(bytearray(submitted.to_bytes(8, 'little') * (block // 8)))
        in_flight[h.aio_pwrite(buf, slot * block)] = buf
        last[slot] = submitted
        submitted += 1
    if not in_flight:
        break
    h.poll(-1)
    for cookie in list(in_flight):
        if h.aio_command_completed(cookie):  # raises if the write failed
            del in_flight[cookie]
            completed += 1
            print(completed, flush=True)
h.flush()
print(json.dumps({'last': last, 'submitted': submitted, 'completed': completed}), flush=True)
h.shutdown()
