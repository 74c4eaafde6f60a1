"""Shared steps of the scripts in scripts/device/ (run on the GPU machine).

  helpers.py texts WORK N           WORK/fixture.txt (the reference fixture's texts) and
                                    WORK/long.txt: N distinct 150-word texts (more than
                                    128 word pieces each, so truncation makes them 128)
  helpers.py cosines WORK BASE TAG..  lowest / mean cosine of WORK/TAG.jsonl against
                                    WORK/BASE.jsonl (kiln run outputs)
  helpers.py eager MODEL TEXTS RUNS OUT_JSON [BENCH_JSON..]
                                    sentence-transformers encode, model.half() on cuda,
                                    batch 256, max_seq_length 128, best of RUNS after a
                                    warm-up; prints each kiln bench JSON's ratio to it
"""
import json
import random
import sys
import time

WORDS = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention").split()


def texts(work, n):
    fixture = json.load(open("tests/fixtures/minilm_reference.json"))["texts"]
    open(f"{work}/fixture.txt", "w").write("\n".join(t.replace("\n", " ") for t in fixture) + "\n")
    rng = random.Random(11)
    lines = (" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(int(n)))
    open(f"{work}/long.txt", "w").write("\n".join(lines) + "\n")


def cosines(work, base, *tags):
    import numpy as np
    load = lambda tag: np.array([json.loads(line)["embedding"] for line in open(f"{work}/{tag}.jsonl")])
    a = load(base)
    for tag in tags:
        b = load(tag)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"{tag} vs {base}: min cosine {cos.min():.6f}, mean {cos.mean():.6f} over {len(cos)} texts")


def eager(model_dir, texts_file, runs, out_json, *benches):
    import torch
    from sentence_transformers import SentenceTransformer
    texts = [line.rstrip("\n") for line in open(texts_file)]
    model = SentenceTransformer(model_dir, device="cuda").half()
    model.max_seq_length = 128
    model.encode(texts[:512], batch_size=256)
    times = []
    for _ in range(int(runs)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.encode(texts, batch_size=256, convert_to_numpy=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    st = len(texts) / min(times)
    print(f"sentence-transformers f16: {len(texts)} texts, best of {runs}: {st:.1f} texts/s "
          f"({[round(t, 3) for t in times]})")
    for path in benches:
        k = json.load(open(path))
        line = f"{path}: {k['throughput_rps']:.1f} texts/s, mean batch {k['mean_batch_size']:.1f}, " \
               f"errors {k['errors']}; ratio to sentence-transformers {k['throughput_rps'] / st:.3f}"
        if "baseline" in k:
            line += f"; baseline {k['baseline']['throughput_rps']:.1f} texts/s, ratio {k['throughput_ratio']:.3f}"
        if len(k.get("replicas", [])) > 1:
            line += "; replicas " + ", ".join(f"{r['device']} {r['rows']}" for r in k["replicas"])
        print(line)
    json.dump({"st_texts_per_s": st, "st_runs_s": times}, open(out_json, "w"))


if __name__ == "__main__":
    {"texts": texts, "cosines": cosines, "eager": eager}[sys.argv[1]](*sys.argv[2:])
