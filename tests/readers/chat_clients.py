"""Calls a `kiln serve` of a generate config with the real `openai` package and prints
what came back as JSON.

    chat_clients.py BASE_URL MODEL

Checks that GET /health answers 200 (the test has waited for the server's "serving"
line); then a chat completion, the same one streamed
(server-sent events, the client's own parser), a plain completion, an embeddings call
(which a generate server refuses), and GET /metrics through prometheus_client's parser.
"""
import json
import sys
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return str(e), ""


def main():
    base, model = sys.argv[1], sys.argv[2]
    if get(base + "/health")[0] != 200:
        raise SystemExit("/health does not answer 200")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of Germany?"}]
    out = {}
    whole = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
    out["chat"] = {"content": whole.choices[0].message.content, "finish": whole.choices[0].finish_reason,
                   "usage": [whole.usage.prompt_tokens, whole.usage.completion_tokens]}
    pieces, finishes = [], []
    for chunk in client.chat.completions.create(model=model, messages=question, max_tokens=24, stream=True):
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    out["stream"] = {"pieces": pieces, "finishes": finishes}
    plain = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6)
    out["completion"] = {"text": plain.choices[0].text, "finish": plain.choices[0].finish_reason}
    try:
        client.embeddings.create(model=model, input="hi")
        out["embeddings"] = "accepted"
    except openai.NotFoundError as e:
        out["embeddings"] = {"status": e.status_code, "message": str(e)}
    status, text = get(base + "/metrics")
    out["metrics"] = {f.name: [[s.name, s.value] for s in f.samples] for f in text_string_to_metric_families(text)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
