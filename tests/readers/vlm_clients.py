"""Calls a `kiln serve` of a vision-language generate config with the real `openai`
package and prints what came back as JSON.

    vlm_clients.py BASE_URL MODEL IMAGE1 IMAGE2 MEDIA_DIR_IMAGE

A chat completion whose message has two `image_url` parts (data: URLs, as OpenAI's
clients send images) and a text part, greedy, 32 tokens: its token count and usage;
then refusals, each read from the error the client raises: a remote URL, a data: URL
that is not an image, a `path` part outside server.allowed_media_dir, and one inside it.
"""
import base64
import json
import sys

import openai


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def main():
    base, model, first, second, inside = sys.argv[1:6]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

    def ask(parts, max_tokens=32):
        messages = [{"role": "user", "content": parts}]
        try:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                               temperature=0)
            return {"content": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                    "usage": [r.usage.prompt_tokens, r.usage.completion_tokens]}
        except openai.APIStatusError as e:
            return {"status": e.status_code, "message": e.response.json()["error"]["message"]}

    question = {"type": "text", "text": "Compare these images."}
    out = {
        "compare": ask([{"type": "image_url", "image_url": {"url": data_url(first)}},
                        {"type": "image_url", "image_url": {"url": data_url(second)}}, question]),
        "remote": ask([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, question]),
        "not_image": ask([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, question]),
        "outside": ask([{"type": "image", "path": "/etc/hostname"}, question]),
        "inside": ask([{"type": "image", "path": inside}, question], max_tokens=4),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
