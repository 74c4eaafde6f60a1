"""Calls a running `kiln serve` the way its users do, and prints what came back as JSON.

    serve_clients.py BASE_URL MODEL TEXTS_JSON API_KEY

- GET /health must answer 200 (the test has waited for the server's "serving" line);
- the real `openai` package: embeddings as floats, as base64, and with `dimensions`;
  a wrong model name (its error);
- plain HTTP for TEI: POST /embed, GET /info;
- GET /metrics parsed by prometheus_client's own text parser;
- CORS preflights from an allowed origin and another one;
- bad requests: a wrong field type, too many inputs, a body over the limit, an unknown
  route, no API key: status and JSON error body of each.
"""
import base64
import json
import struct
import sys
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


KEY = {}


def call(url, body=None, raw=None, key=True):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {KEY['key']}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def main():
    base, model, texts, KEY["key"] = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    status, _, body = call(base + "/health", key=False)
    if status != 200:
        raise SystemExit(f"/health answered {status}: {body}")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY["key"], max_retries=0)
    out = {}
    floats = client.embeddings.create(model=model, input=texts)
    out["openai_float"] = [d.embedding for d in floats.data]
    out["openai_usage"] = floats.usage.prompt_tokens
    out["openai_model"] = floats.model
    # The client asks for base64 unless told otherwise and decodes it itself; ask for
    # it explicitly through the raw response too, to check the bytes.
    b64 = client.embeddings.create(model=model, input=texts, encoding_format="base64")

    def floats_of(e):
        # Asked for base64 explicitly, the client hands the string back as it came.
        if isinstance(e, str):
            blob = base64.b64decode(e)
            return list(struct.unpack(f"<{len(blob) // 4}f", blob))
        return e

    out["openai_base64"] = [floats_of(d.embedding) for d in b64.data]
    status, _, body = call(base + "/v1/embeddings", {"model": model, "input": texts, "encoding_format": "base64"})
    raw = json.loads(body)["data"][0]["embedding"]
    blob = base64.b64decode(raw)
    out["raw_base64_first"] = list(struct.unpack(f"<{len(blob) // 4}f", blob))
    dims = client.embeddings.create(model=model, input=texts[:2], dimensions=64)
    out["openai_dims"] = [d.embedding for d in dims.data]
    try:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
        out["wrong_model"] = "accepted"
    except openai.NotFoundError as e:
        out["wrong_model"] = {"status": e.status_code, "message": str(e)}
    status, _, body = call(base + "/embed", {"inputs": texts})
    out["tei"] = {"status": status, "vectors": json.loads(body)}
    status, _, body = call(base + "/info")
    out["info"] = {"status": status, "body": json.loads(body)}
    status, headers, body = call(base + "/metrics", key=False)
    families = {}
    for family in text_string_to_metric_families(body):
        families[family.name] = {"type": family.type,
                                 "samples": [[s.name, s.labels, s.value] for s in family.samples]}
    out["metrics"] = families
    # A browser's preflight from an allowed origin and from another one.
    cors = {}
    for origin in ["https://app.example", "https://elsewhere.example"]:
        req = urllib.request.Request(base + "/v1/embeddings", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization"})
        with urllib.request.urlopen(req, timeout=30) as r:
            cors[origin] = {"status": r.status, "allow": r.headers.get("Access-Control-Allow-Origin")}
    out["cors"] = cors
    bad = {}
    bad["wrong_type"] = call(base + "/embed", {"inputs": "hi", "normalize": 3})
    bad["too_many"] = call(base + "/embed", {"inputs": ["x"] * 10000})
    bad["too_large"] = call(base + "/embed", raw=json.dumps({"inputs": "a" * 3_000_000}).encode())
    bad["not_json"] = call(base + "/v1/embeddings", raw=b"{not json")
    bad["no_route"] = call(base + "/v2/nothing")
    bad["no_key"] = call(base + "/embed", {"inputs": "hi"}, key=False)
    bad["over_queue"] = call(base + "/embed", {"inputs": ["x"] * 9})
    bad["trailing"] = call(base + "/embed", raw=b'{"inputs": "x"}garbage')
    bad["long_model"] = call(base + "/v1/embeddings", {"model": "m" * 100000, "input": "x"})
    def oip(rows, length):
        ones = [1] * (rows * length)
        inputs = [{"name": n, "shape": [rows, length], "datatype": "INT64", "data": ones}
                  for n in ("input_ids", "attention_mask", "token_type_ids")]
        status, _, body = call(base + "/v2/models/" + model + "/infer", {"inputs": inputs})
        return {"status": status, "body": json.loads(body)}
    out["oip_rows"] = oip(9, 4)
    out["oip_long"] = oip(1, 600)
    bad["info_no_key"] = call(base + "/info", key=False)
    bad["v2_ready_no_key"] = call(base + "/v2/health/ready", key=False)
    out["v2_live_no_key"] = call(base + "/v2/health/live", key=False)[0]
    out["bad"] = {k: {"status": s, "retry_after": h.get("Retry-After"), "body": json.loads(b)}
                  for k, (s, h, b) in bad.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
