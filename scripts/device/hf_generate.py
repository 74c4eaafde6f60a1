#!/usr/bin/env python3
"""The Python baseline for generation: Hugging Face transformers' `generate` on the same
GGUF file (transformers dequantizes it with the `gguf` package), greedy, the model's chat
template, N new tokens per prompt (end-of-turn ignored, so every run makes exactly N).

    hf_generate.py GGUF DEVICE DTYPE NEW_TOKENS BATCH... > figures.json

For each batch size: that many prompts ("Write a long story about ...", left-padded
together) in one `generate` call, timed after a warm-up call of the same shape; prints
tokens/s in all. Batch 1 is one stream.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TOPICS = ["a dragon", "the sea", "a robot", "a city at night", "a lost key", "winter", "a baker", "the moon",
          "a train", "a garden", "an old map", "a storm", "a violin", "a lighthouse", "a fox", "a desert"]


def main():
    path, device, dtype, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    batches = [int(b) for b in sys.argv[5:]] or [1]
    folder, name = path.rsplit("/", 1)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    load = time.perf_counter() - started
    results = {"device": device, "dtype": dtype, "new_tokens": new, "load_s": load,
               "torch": torch.__version__, "runs": []}
    for batch in batches:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Write a long story about {TOPICS[i % 16]}."}],
                                               tokenize=False, add_generation_prompt=True) for i in range(batch)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        args = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            model.generate(**enc, **args)  # warm-up of the same shape
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(**enc, **args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        made = (out.shape[1] - enc["input_ids"].shape[1]) * batch
        run = {"batch": batch, "tokens": int(made), "seconds": seconds, "tokens_per_s": made / seconds}
        if batch == 1:
            run["text"] = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)[:200]
        results["runs"].append(run)
        print(f"transformers {dtype} on {device}, batch {batch}: {made} tokens in {seconds:.2f} s, "
              f"{made / seconds:.1f} tokens/s", file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
