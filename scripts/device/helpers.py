"""Shared steps of the scripts in scripts/device/ (run on the GPU machine).

  helpers.py texts WORK N [mixed]   WORK/fixture.txt (the reference fixture's texts) and
                                    WORK/long.txt: N distinct 150-word texts (more than
                                    128 word pieces each, so truncation makes them 128);
                                    `mixed`: every third word German, Chinese, Arabic or
                                    an emoji (texts that are not plain ASCII)
  helpers.py cosines WORK BASE TAG..  lowest / mean cosine of WORK/TAG.jsonl against
                                    WORK/BASE.jsonl (kiln run outputs)
  helpers.py eager MODEL TEXTS RUNS OUT_JSON [BENCH_JSON..]
                                    sentence-transformers encode, model.half() on cuda,
                                    batch 256, max_seq_length 128, best of RUNS after a
                                    warm-up; prints each kiln bench JSON's ratio to it
  helpers.py ceiling MODEL TEXTS RUNS OUT_JSON [TORCHSCRIPT_DIR] [BENCH_JSON..]
                                    the model-only ceiling: the texts tokenized beforehand
                                    into batches of 256 (128 tokens at most) already on
                                    the GPU, then the folder's model in PyTorch eager
                                    (f16) + mean pooling + L2 normalisation on the GPU,
                                    best of RUNS passes; the same for kiln's TorchScript
                                    trace in TORCHSCRIPT_DIR (its own f32 -> f16 cast, as
                                    the tch provider loads it), to tell TorchScript from
                                    eager; torch.compile of the model (COMPILE_MODES,
                                    default max-autotune) at f16 and bf16, and eager bf16;
                                    prints each kiln bench JSON's ratio to the ceiling, to
                                    eager f16 and to the best torch.compile
  helpers.py scores BASE.jsonl OTHER.jsonl..
                                    classify outputs (kiln run): per OTHER, the largest
                                    score difference to BASE over images with the same
                                    path, and how many top-1 labels agree
  helpers.py model_rate PROFILE.json IMAGES
                                    images/s of the model's own runs (the profiler's
                                    model_run spans) next to the whole run's
  helpers.py shapes TORCHSCRIPT_DIR OUT_JSON
                                    what a new input shape costs: kiln's TorchScript trace
                                    (f16, cuda) and the same for eager PyTorch, run on
                                    batches of 40 different sizes at 128 tokens, each size
                                    three times; first, second and third run per size, for
                                    the profiling executor, the legacy executor and no
                                    graph optimisation
"""
import json
import random
import sys
import time

WORDS = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention").split()


FOREIGN = ("Straße Größe schön Übersetzung Mädchen über 模型 推理 中文分词 速度 服务器 "
           "مَرْحَبًا النموذج سريع خادم 😀 🚀 👍").split()


def texts(work, n, kind="ascii"):
    fixture = json.load(open("tests/fixtures/minilm_reference.json"))["texts"]
    open(f"{work}/fixture.txt", "w").write("\n".join(t.replace("\n", " ") for t in fixture) + "\n")
    rng = random.Random(11)
    word = lambda i: rng.choice(FOREIGN) if kind == "mixed" and i % 3 == 0 else rng.choice(WORDS)
    lines = (" ".join(word(i) for i in range(150)) for _ in range(int(n)))
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


def _timed_passes(run, batches, runs):
    import torch
    for ids, mask in batches[:2]:
        run(ids, mask)
    torch.cuda.synchronize()
    times = []
    for _ in range(int(runs)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for ids, mask in batches:
            run(ids, mask)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def ceiling(model_dir, texts_file, runs, out_json, torchscript_dir="", *benches):
    import torch
    from sentence_transformers import SentenceTransformer
    texts = [line.rstrip("\n") for line in open(texts_file)]
    st = SentenceTransformer(model_dir, device="cuda").half()
    tokenizer = st.tokenizer
    batches = []
    for start in range(0, len(texts), 256):
        enc = tokenizer(texts[start:start + 256], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        batches.append((enc["input_ids"].cuda(), enc["attention_mask"].cuda()))
    tokens = sum(int(m.sum()) for _, m in batches)
    bert = st[0].auto_model.eval()

    def pool(hidden, mask):
        m = mask.unsqueeze(-1).to(hidden.dtype)
        v = (hidden * m).sum(1).float() / m.sum(1).float().clamp(min=1e-9)
        return torch.nn.functional.normalize(v, dim=1)

    def eager(ids, mask):
        with torch.inference_mode():
            return pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    result = {"texts": len(texts), "tokens": tokens, "batches": len(batches)}
    times = _timed_passes(eager, batches, runs)
    result["eager_texts_per_s"] = len(texts) / min(times)
    result["eager_runs_s"] = times
    print(f"ceiling, eager f16 ({bert.config._attn_implementation} attention): {len(texts)} texts in "
          f"{len(batches)} batches of <= 256, {tokens} tokens: {result['eager_texts_per_s']:.0f} texts/s "
          f"({min(times) / len(batches) * 1000:.2f} ms a batch; passes {[round(t, 3) for t in times]})")
    # torch.compile on the same batches (all [256, 128]: one static shape), in each
    # mode of COMPILE_MODES (space-separated; "none" skips), at each precision of
    # COMPILE_DTYPES (default "f16 bf16").
    import copy
    import os
    for mode in os.environ.get("COMPILE_MODES", "max-autotune").split():
        if mode == "none":
            continue
        dtypes = {"f16": torch.float16, "bf16": torch.bfloat16}
        for dtype in (dtypes[d] for d in os.environ.get("COMPILE_DTYPES", "f16 bf16").split()):
            # A fresh copy per precision and a reset: inductor's cached graphs and CUDA
            # graph trees keep the first compile's parameters.
            torch._dynamo.reset()
            model = copy.deepcopy(bert).to(dtype)
            compiled = torch.compile(model, mode=mode)

            def run_compiled(ids, mask, compiled=compiled):
                with torch.inference_mode():
                    return pool(compiled(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

            t0 = time.perf_counter()
            run_compiled(*batches[0])
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            times = _timed_passes(run_compiled, batches, runs)
            name = "f16" if dtype == torch.float16 else "bf16"
            key = f"compile_{mode.replace('-', '_')}_{name}_texts_per_s"
            result[key] = len(texts) / min(times)
            result[key.replace("_texts_per_s", "_compile_s")] = compile_s
            print(f"torch.compile mode={mode} {name}: {result[key]:.0f} texts/s "
                  f"({min(times) / len(batches) * 1000:.2f} ms a batch; compiled in {compile_s:.0f} s)", flush=True)
            del compiled, model
        torch._dynamo.reset()
    bert_bf16 = copy.deepcopy(bert).to(torch.bfloat16)

    def eager_bf16(ids, mask):
        with torch.inference_mode():
            return pool(bert_bf16(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    times = _timed_passes(eager_bf16, batches, runs)
    result["eager_bf16_texts_per_s"] = len(texts) / min(times)
    print(f"ceiling, eager bf16: {result['eager_bf16_texts_per_s']:.0f} texts/s", flush=True)
    del bert_bf16
    if torchscript_dir:
        module = torch.jit.load(f"{torchscript_dir}/model.pt", map_location="cuda").half().eval()

        def traced(ids, mask):
            with torch.no_grad():
                return pool(module(ids, mask, torch.zeros_like(ids)), mask)

        for profiling in (True, False):
            torch._C._jit_set_profiling_executor(profiling)
            times = _timed_passes(traced, batches, runs)
            key = "torchscript_texts_per_s" + ("" if profiling else "_no_profiling")
            result[key] = len(texts) / min(times)
            print(f"TorchScript trace, profiling executor {'on' if profiling else 'off'}: {result[key]:.0f} texts/s "
                  f"({min(times) / len(batches) * 1000:.2f} ms a batch)")
        torch._C._jit_set_profiling_executor(True)
    # The best way the GPU ran the model in this call is the ceiling.
    ceiling_rate = max(v for k, v in result.items() if k.endswith("_texts_per_s") or k.endswith("_no_profiling"))
    result["ceiling_texts_per_s"] = ceiling_rate
    print(f"ceiling (best of the above): {ceiling_rate:.0f} texts/s")
    eager_rate = result["eager_texts_per_s"]
    compiled = [v for k, v in result.items() if k.startswith("compile_") and k.endswith("_texts_per_s")]
    for path in benches:
        if not os.path.exists(path):
            print(f"{path}: missing (its run failed)")
            continue
        k = json.load(open(path))
        line = (f"{path}: {k['throughput_rps']:.0f} texts/s, mean batch {k['mean_batch_size']:.1f}, errors "
                f"{k['errors']}; ratio to the model-only ceiling {k['throughput_rps'] / ceiling_rate:.3f}, "
                f"to eager f16 {k['throughput_rps'] / eager_rate:.3f}")
        if compiled:
            line += f", to the best torch.compile {k['throughput_rps'] / max(compiled):.3f}"
        print(line)
    json.dump(result, open(out_json, "w"), indent=1)


SHAPE_MODES = ("profiling", "legacy", "no_optimize")


def shape_costs(torchscript_dir, mode):
    """One executor mode, in a process of its own (the modes are process-wide): the
    trace at f16 on batches of 40 sizes, each size run three times; JSON on stdout."""
    import torch
    sizes = random.Random(5).sample(range(1, 257), 40)
    torch._C._jit_set_profiling_executor(mode == "profiling")
    torch._C._set_graph_executor_optimize(mode != "no_optimize")
    module = torch.jit.load(f"{torchscript_dir}/model.pt", map_location="cuda").half().eval()
    ids = torch.randint(1000, 2000, (256, 128), device="cuda")
    mask = torch.ones_like(ids)
    per_run = [[], [], []]
    with torch.no_grad():
        module(ids, mask, torch.zeros_like(ids))
        for b in sizes:
            for k in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                module(ids[:b], mask[:b], torch.zeros_like(ids[:b]))
                torch.cuda.synchronize()
                per_run[k].append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"sizes": sizes, "ms": per_run}))


def shapes(torchscript_dir, out_json):
    import subprocess
    result = {}
    for mode in SHAPE_MODES:
        run = subprocess.run([sys.executable, __file__, "shape_costs", torchscript_dir, mode],
                             capture_output=True, text=True)
        if run.returncode != 0:
            why = (run.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"shapes, TorchScript {mode}: failed: {why}")
            result[mode] = {"error": run.stderr[-4000:]}
            continue
        result[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        first, second, third = result[mode]["ms"]
        n = len(first)
        print(f"shapes, TorchScript {mode}: {n} new batch sizes at 128 tokens: first run mean "
              f"{sum(first) / n:.1f} ms (max {max(first):.1f}), second {sum(second) / n:.1f} ms "
              f"(max {max(second):.1f}), third {sum(third) / n:.2f} ms (max {max(third):.1f})")
    json.dump(result, open(out_json, "w"))


SPANS = ("model_run", "batch_run", "device_wait", "collate", "tokenize", "queue_wait", "request")


def spans(*profiles):
    """One line per profiler report: the request path's spans, p50 and count."""
    for path in profiles:
        found = json.load(open(path))["spans"]
        print(path.rsplit("/", 1)[-1], ", ".join(f"{k} p50 {v['p50_ms']:.2f} ms x{v['count']}"
                                                 for k, v in sorted(found.items()) if k in SPANS))


def _classified(path):
    rows = [json.loads(line) for line in open(path)]
    return {r["path"]: {t["label"]: t["score"] for t in r["top_k"]} for r in rows if "top_k" in r}


def scores(base, *others):
    ref = _classified(base)
    for other in others:
        got = _classified(other)
        common = ref.keys() & got.keys()
        gap = max((abs(got[p][l] - ref[p][l]) for p in common for l in ref[p]), default=float("nan"))
        top = lambda s: max(s, key=s.get)
        agree = sum(top(got[p]) == top(ref[p]) for p in common)
        print(f"{other}: {len(common)} images, largest score difference {gap:.2e}, top-1 agrees {agree}/{len(common)}")


def model_rate(profile, images):
    p = json.load(open(profile))
    run_s = p["spans"]["model_run"]["total_ms"] / 1000
    whole_s = p["spans"]["request"]["total_ms"] / 1000 if "request" in p["spans"] else p["duration_s"]
    n = int(images)
    print(f"{profile}: {n / whole_s:.0f} images/s overall, {n / run_s:.0f} images/s in model_run "
          f"({p['spans']['model_run']['count']} batches, {run_s:.2f} s)")


def kernels(csv_path, label, top="16"):
    """Per-kernel GPU time from `ncu --metrics gpu__time_duration.sum --csv`, largest first."""
    import collections
    import csv
    rows = [r for r in csv.DictReader(line for line in open(csv_path) if line.startswith('"'))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    by = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        name = r["Kernel Name"].split("(")[0][:60]
        by[name][0] += 1
        by[name][1] += float(r["Metric Value"].replace(",", "")) / 1e6
    print(f"{label}: {len(rows)} kernels, {sum(v[1] for v in by.values()):.2f} ms "
          "(the load's probe batch and one of 256 x 128)")
    for name, (n, ms) in sorted(by.items(), key=lambda kv: -kv[1][1])[:int(top)]:
        print(f"  {ms:8.3f} ms {n:4d}x  {name}")


def random_bert(model_dir, seed="0"):
    """Writes MODEL_DIR/model.safetensors: a BERT of MODEL_DIR/config.json with seeded
    random weights (transformers' own initialisation) in float16. A model of the real
    one's shapes costs as much to run and needs no weights carried (a call carries at
    most 64 MiB); agreement is checked between kiln's devices on the same file."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel
    torch.manual_seed(int(seed))
    model = BertModel(BertConfig.from_pretrained(model_dir))
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, f"{model_dir}/model.safetensors", metadata={"format": "pt"})
    print(f"random BERT in {model_dir}: {sum(t.numel() for t in tensors.values())} parameters, f16")


if __name__ == "__main__":
    {"texts": texts, "cosines": cosines, "eager": eager, "ceiling": ceiling, "shapes": shapes,
     "shape_costs": shape_costs, "spans": spans, "kernels": kernels,
     "scores": scores, "model_rate": model_rate, "random_bert": random_bert}[sys.argv[1]](*sys.argv[2:])
