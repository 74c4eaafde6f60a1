"""Calls a running `kiln serve` through the Open Inference Protocol v2 with the real
`tritonclient[http]` (JSON tensors), and prints what came back as JSON.

    oip_clients.py HOST:PORT MODEL

The test has waited for the server's "serving" line; then liveness, readiness, model
metadata, an infer of "[CLS] hello world [SEP]" as BERT token ids (JSON tensors, then
binary tensor data both ways, tritonclient's default), and an infer with a wrong
datatype (its error).
"""
import json
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def main():
    url, model = sys.argv[1], sys.argv[2]
    client = http.InferenceServerClient(url=url)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready(model), "metadata": client.get_model_metadata(model)}
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    inputs = []
    for name, value in [("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("token_type_ids", np.zeros_like(ids))]:
        i = http.InferInput(name, list(value.shape), "INT64")
        i.set_data_from_numpy(value, binary_data=False)
        inputs.append(i)
    names = [o["name"] for o in out["metadata"]["outputs"]]
    result = client.infer(model, inputs, outputs=[http.InferRequestedOutput(n, binary_data=False) for n in names])
    out["outputs"] = {n: result.as_numpy(n).tolist() for n in names}
    # tritonclient's default: the binary tensor data extension, both ways.
    binary_inputs = []
    for name, value in [("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("token_type_ids", np.zeros_like(ids))]:
        i = http.InferInput(name, list(value.shape), "INT64")
        i.set_data_from_numpy(value)
        binary_inputs.append(i)
    result = client.infer(model, binary_inputs, outputs=[http.InferRequestedOutput(n) for n in names])
    out["binary_outputs"] = {n: result.as_numpy(n).tolist() for n in names}
    out["extensions"] = client.get_server_metadata()["extensions"]
    bad = http.InferInput("input_ids", [1, 4], "FP32")
    bad.set_data_from_numpy(ids.astype(np.float32), binary_data=False)
    try:
        client.infer(model, [bad] + inputs[1:])
        out["bad"] = "accepted"
    except InferenceServerException as e:
        out["bad"] = {"status": e.status(), "message": e.message()}
    try:
        client.get_model_metadata("nope")
        out["unknown"] = "accepted"
    except InferenceServerException as e:
        out["unknown"] = {"status": e.status(), "message": e.message()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
