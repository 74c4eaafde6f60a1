"""Loads a Chrome trace-event file with Python's json and prints what it holds as
JSON: complete-event counts per name, counter samples per name, thread names, whether
every complete event has pid/tid/ts/dur, and the largest RSS counter value.

Usage: read_chrome_trace.py TRACE.json
"""
import collections
import json
import sys

with open(sys.argv[1]) as f:
    trace = json.load(f)
events = trace["traceEvents"]
complete = [e for e in events if e.get("ph") == "X"]
counters = [e for e in events if e.get("ph") == "C"]
out = {
    "spans": collections.Counter(e["name"] for e in complete),
    "counters": collections.Counter(e["name"] for e in counters),
    "threads": sorted({e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}),
    "complete_events_have_fields": all(
        isinstance(e.get(k), (int, float)) for e in complete for k in ("pid", "tid", "ts", "dur")
    ),
    "rss_mib_max": max((e["args"]["rss_mib"] for e in counters if e["name"] == "memory"), default=0),
}
json.dump(out, sys.stdout)
