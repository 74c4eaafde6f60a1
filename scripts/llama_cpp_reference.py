#!/usr/bin/env python3
"""llama.cpp beside kiln on SmolLM2-135M-Instruct (the GGUF file `scripts/setup generate`
fetches): writes tests/fixtures/smollm2_llama_cpp.json — for a few chat prompts, the
prompt's token ids and llama.cpp's greedy tokens, which a test compares with kiln's — and,
given a kiln binary, measures both decoding one stream side by side in this run.

Run once, from a venv with llama-cpp-python (built from PyPI's source; not needed to run
kiln's tests):

    python3 -m venv /tmp/llama
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        /tmp/llama/bin/pip install llama-cpp-python==0.3.36
    scripts/setup generate
    /tmp/llama/bin/python scripts/llama_cpp_reference.py [--kiln target/release/kiln] [--threads 2]

(A `-DGGML_NATIVE=ON` build segfaulted on multi-token prompts on an AVX-512 machine.)
Both sides: the same file, the prompt rendered with the file's own chat template, greedy,
128 new tokens, the same number of threads, best of 3; kiln's quantization is whatever
its config picks (printed). With a kiln binary it also compares the prompt rate: a chat
prompt of about `--prompt-tokens` (512) tokens — llama.cpp's `eval` of it (one batch of
512), kiln's time to first token for it with one new token (`kiln run`, whatever its
config reads a step) — best of 3 each.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jinja2
from llama_cpp import Llama

root = pathlib.Path(__file__).resolve().parent.parent
gguf = root / ".kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
out = root / "tests/fixtures/smollm2_llama_cpp.json"
PROMPTS = [
    "What is the capital of Germany?",
    "What is the capital of Japan?",
    "Name three colours.",
    "Write a haiku about a kiln.",
]
STORY = "Write a long story about a dragon."
NEW = 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", help="a kiln binary: measure it side by side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    args = ap.parse_args()
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False, seed=0)
    template = jinja2.Template(llm.metadata["tokenizer.chat_template"])
    eos = {int(llm.metadata["tokenizer.ggml.eos_token_id"])}

    def prompt_ids(question):
        text = template.render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)
        return llm.tokenize(text.encode(), add_bos=False, special=True)

    def greedy(ids, n, stop_at_eos=True):
        llm.reset()
        got = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if stop_at_eos and token in eos:
                break
            got.append(int(token))
            if len(got) == n:
                break
        return got

    prompts = []
    for q in PROMPTS:
        ids = prompt_ids(q)
        gen = greedy(ids, args.reference_tokens)
        prompts.append({"prompt": q, "prompt_ids": [int(i) for i in ids], "ids": gen,
                        "text": llm.detokenize(gen).decode("utf-8", "replace")})
        print(f"llama.cpp: {q!r} -> {prompts[-1]['text']!r}", file=sys.stderr)

    story = prompt_ids(STORY)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        greedy(story, NEW, stop_at_eos=False)
        best = min(best, time.perf_counter() - started)
    llama_rate = NEW / best
    result = {
        "model": gguf.name,
        "llama_cpp": "llama-cpp-python " + __import__("llama_cpp").__version__,
        "threads": args.threads,
        "prompts": prompts,
        "llama_cpp_tokens_per_s": round(llama_rate, 1),
    }
    print(f"llama.cpp: {NEW} tokens after a {len(story)}-token prompt, best of 3: {llama_rate:.1f} tokens/s",
          file=sys.stderr)

    if args.kiln:
        with tempfile.TemporaryDirectory() as d:
            inp, outp = pathlib.Path(d, "p.jsonl"), pathlib.Path(d, "a.jsonl")
            inp.write_text(json.dumps({"id": 0, "prompt": STORY}) + "\n")
            env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
            rates = []
            for _ in range(3):
                run = subprocess.run([args.kiln, "run", str(root / "examples/generate.toml"), "--input", str(inp),
                                      "--output", str(outp), "--set", f"generate.max_new_tokens={NEW}"],
                                     env=env, capture_output=True, text=True, check=True)
                row = json.loads(outp.read_text())
                rates.append(row["tokens"] / (row["elapsed_ms"] / 1000))
            summary = run.stderr.strip().splitlines()[-1]
            kiln_rate = max(rates)
            print(f"kiln: {row['tokens']} tokens, best of 3: {kiln_rate:.1f} tokens/s ({summary})", file=sys.stderr)
            print(f"kiln / llama.cpp: {kiln_rate / llama_rate:.2f}x", file=sys.stderr)
            result["kiln_tokens_per_s"] = round(kiln_rate, 1)

            # The prompt rate: a long question, rendered as a chat prompt.
            sentence = "The kiln fires the clay slowly so that the pots do not crack in the heat. "
            question = "Summarise this text. "
            while len(prompt_ids(question + sentence)) <= args.prompt_tokens:
                question += sentence
            ids = prompt_ids(question)
            best = float("inf")
            for _ in range(3):
                llm.reset()
                started = time.perf_counter()
                llm.eval(ids)
                best = min(best, time.perf_counter() - started)
            llama_prompt = len(ids) / best
            inp.write_text(json.dumps({"id": 0, "prompt": question}) + "\n")
            ttfts = []
            for _ in range(3):
                subprocess.run([args.kiln, "run", str(root / "examples/generate.toml"), "--input", str(inp),
                                "--output", str(outp), "--set", "generate.max_new_tokens=1",
                                "--set", "generate.prefix_cache_mb=0"],
                               env=env, capture_output=True, text=True, check=True)
                row = json.loads(outp.read_text())
                ttfts.append(row["ttft_ms"] / 1000)
            kiln_prompt = row["prompt_tokens"] / min(ttfts)
            print(f"prompt of {len(ids)} tokens (kiln {row['prompt_tokens']}): llama.cpp {llama_prompt:.0f} tokens/s, "
                  f"kiln {kiln_prompt:.0f} tokens/s (time to first token {min(ttfts) * 1000:.0f} ms): "
                  f"{kiln_prompt / llama_prompt:.2f}x", file=sys.stderr)
            result["prompt_tokens"] = len(ids)
            result["llama_cpp_prompt_tokens_per_s"] = round(llama_prompt)
            result["kiln_prompt_tokens_per_s"] = round(kiln_prompt)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(root)}", file=sys.stderr)


if __name__ == "__main__":
    main()
