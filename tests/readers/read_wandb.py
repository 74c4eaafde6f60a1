"""Reads an offline W&B run file with the wandb package's own reader (DataStore of
wandb 0.19.11) and prints its records as JSON: the kinds in order, the run (id,
project, name, config), the history rows, the summary and the files to upload, as
`wandb sync` sees them.

Usage: read_wandb.py RUN_FILE.wandb
"""
import json
import sys

import wandb
from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal import datastore

# DataStore refuses to run outside wandb's internal process unless told otherwise.
wandb._assert_is_internal_process = True


def key(item):
    return item.key or "/".join(item.nested_key)


store = datastore.DataStore()
store.open_for_scan(sys.argv[1])
out = {"kinds": [], "run": None, "history": [], "summary": {}, "files": []}
while True:
    data = store.scan_data()
    if data is None:
        break
    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    kind = record.WhichOneof("record_type")
    out["kinds"].append(kind)
    if kind == "run":
        run = record.run
        out["run"] = {
            "run_id": run.run_id,
            "project": run.project,
            "display_name": run.display_name,
            "config": {c.key: json.loads(c.value_json) for c in run.config.update},
        }
    elif kind == "history":
        row = {key(i): json.loads(i.value_json) for i in record.history.item}
        row["step.num"] = record.history.step.num
        out["history"].append(row)
    elif kind == "summary":
        for i in record.summary.update:
            out["summary"][key(i)] = json.loads(i.value_json)
    elif kind == "files":
        out["files"].extend(f.path for f in record.files.files)
    elif kind == "exit":
        out["exit_code"] = record.exit.exit_code
json.dump(out, sys.stdout)
