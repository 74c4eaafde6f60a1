#!/usr/bin/env python3
"""Times `kiln run` against sentence-transformers and OpenVINO on the same texts, on this
machine, in one run, and prints each throughput, its ratio to sentence-transformers and
to OpenVINO's default, and how close its embeddings are to sentence-transformers' f32
(cosine, worst and mean).

    scripts/setup compare ort && . .kiln/env
    cargo build --release -p kiln-cli --features ort
    .kiln/compare/bin/python scripts/compare_sentence_transformers.py examples/embed.toml \\
        examples/embed-ort.toml examples/embed-int8.toml examples/embed-ort-int8.toml

`scripts/setup compare` makes the venv (.kiln/compare: sentence-transformers and
OpenVINO over the torch that `scripts/setup tch` caches). OpenVINO is the strongest peer
on a CPU: what sentence-transformers' own `backend="openvino"` runs, here on kiln's
plain ONNX export (.kiln/models/all-MiniLM-L6-v2-onnx, `scripts/setup ort`) with its
defaults (bf16 on a CPU with AMX) and with `INFERENCE_PRECISION_HINT=f32`, the texts
tokenized by HF tokenizers, sorted by length into batches of --batch, mean-pooled in
numpy (`--no-openvino` leaves it out). Each CONFIG is a kiln config for the embed task
(default: examples/embed.toml); a config for the ort provider needs a binary built with
`--features ort`.

The texts are generated from a fixed seed: lengths of 5 to 200 words, uniformly, of
natural-looking sentences in English, German, Chinese (a "word" is a 1-2 character
token, written without spaces), Arabic and a sprinkling of emoji — the mix of issue 13.
Runs alternate (sentence-transformers, then each config, --rounds times) and the
medians are compared, so a noisy neighbour hurts every side alike. kiln's figure is
the embedding time it reports (model load excluded); sentence-transformers' is the
time of `encode` after one warm-up call. Both use every core; both see batches of
--batch texts (kiln: `batching.max_batch_size`).
"""
import argparse
import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

root = pathlib.Path(__file__).resolve().parent.parent

ENGLISH = (
    "the model reads every document in the archive and returns a short summary for the search team "
    "before the meeting on monday we checked the latency of each request and found that the queue was "
    "full because three workers had stopped responding after the deploy of the new version people "
    "who travel often prefer small hotels near the station where breakfast is served early and the "
    "rooms are quiet enough to sleep through the noise of the city"
).split()
GERMAN = (
    "die Bibliothek öffnet morgen früh um neun Uhr und schließt erst spät am Abend wenn alle Bücher "
    "zurückgegeben wurden unser Zug hatte wegen eines Signalfehlers fast zwanzig Minuten Verspätung "
    "aber niemand im Abteil beschwerte sich über die Wartezeit größere Straßen führen über die "
    "Brücke ins Zentrum wo der Markt jeden Samstag stattfindet"
).split()
CHINESE = (
    "我们 今天 在 图书馆 里 讨论 了 新 模型 的 推理 速度 和 内存 使用 情况 大家 都 认为 缓存 可以 "
    "明显 减少 延迟 北京 的 天气 很 好 适合 出去 散步 他 昨天 买 了 一 本 关于 历史 的 书 晚上 "
    "我们 一起 吃饭 然后 看 电影"
).split()
ARABIC = (
    "ذهبت إلى السوق في الصباح واشتريت الخبز والفاكهة ثم عدت إلى البيت قبل الظهر يعمل الفريق على "
    "تحسين سرعة النموذج وتقليل استهلاك الذاكرة في الخوادم الجديدة كانت الرحلة طويلة لكن المناظر "
    "على الطريق جميلة جدا"
).split()
EMOJI = ["🙂", "🚀", "👍", "🎉", "🔥", "☕", "📚", "🌍", "✨", "😅"]
LANGUAGES = [(ENGLISH, " ", 0.45), (GERMAN, " ", 0.2), (CHINESE, "", 0.15), (ARABIC, " ", 0.2)]


def sentence(rng: random.Random, words: int) -> str:
    pool, sep, _ = rng.choices(LANGUAGES, weights=[w for _, _, w in LANGUAGES])[0]
    start = rng.randrange(len(pool))
    picked = [pool[(start + i) % len(pool)] if rng.random() < 0.7 else rng.choice(pool) for i in range(words)]
    if rng.random() < 0.3:
        picked.insert(rng.randrange(len(picked) + 1), rng.choice(EMOJI))
    text = sep.join(picked)
    return text[:1].upper() + text[1:] + ("。" if sep == "" else ".")


def texts(n: int, seed: int = 13) -> list[str]:
    """n texts of 5-200 words; a text is one or more sentences of one language each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        left, parts = rng.randint(5, 200), []
        while left > 0:
            words = min(left, rng.randint(5, 30))
            parts.append(sentence(rng, words))
            left -= words
        out.append(" ".join(parts))
    return out


def run_kiln(config: str, binary: pathlib.Path, inp: pathlib.Path, out: pathlib.Path, batch: int):
    cmd = [str(binary), "run", config, "--input", str(inp), "--output", str(out),
           "--set", f"batching.max_batch_size={batch}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"kiln failed on {config}:\n{run.stderr}")
    m = re.search(r"embedded (\d+) texts in ([\d.]+) s .*with (\w+) on (\S+) \(([^)]+)\)", run.stderr)
    if not m:
        sys.exit(f"kiln's summary line is missing from:\n{run.stderr}")
    rows = [json.loads(line)["embedding"] for line in out.read_text().splitlines()]
    return int(m.group(1)) / float(m.group(2)), f"{m.group(3)}, {m.group(4)}, {m.group(5)}", rows


def openvino_encoder(hint):
    """An encode(texts, batch) over OpenVINO's CPU plugin: `hint` None for its defaults,
    else INFERENCE_PRECISION_HINT. Tokenization and pooling are in the timed call, as
    kiln's and sentence-transformers' are in theirs."""
    import numpy as np
    import openvino as ov
    from tokenizers import Tokenizer

    folder = root / ".kiln/models/all-MiniLM-L6-v2-onnx"
    if not (folder / "model.onnx").is_file():
        sys.exit(f"{folder}/model.onnx is missing: run `scripts/setup ort` (kiln's ONNX export), or pass --no-openvino")
    max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    compiled = ov.Core().compile_model(str(folder / "model.onnx"), "CPU",
                                       {} if hint is None else {"INFERENCE_PRECISION_HINT": hint})
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_len)

    def encode(data, batch):
        out = np.empty((len(data), compiled.outputs[0].get_partial_shape()[2].get_length()), np.float32)
        order = sorted(range(len(data)), key=lambda i: len(data[i]))
        for start in range(0, len(data), batch):
            picked = order[start:start + batch]
            encodings = tokenizer.encode_batch([data[i] for i in picked])
            width = max(len(e.ids) for e in encodings)
            ids, mask, types = (np.zeros((len(picked), width), np.int64) for _ in range(3))
            for row, e in enumerate(encodings):
                ids[row, :len(e.ids)], mask[row, :len(e.ids)], types[row, :len(e.ids)] = e.ids, 1, e.type_ids
            hidden = compiled({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
            out[picked] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out

    return encode


def cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=["examples/embed.toml"])
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binary", default=str(root / "target/release/kiln"))
    ap.add_argument("--save-texts", help="also write the generated texts to this file, one per line")
    ap.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    data = texts(args.texts)
    if args.save_texts:
        pathlib.Path(args.save_texts).write_text("\n".join(data) + "\n")
    model = SentenceTransformer(str(root / ".kiln/models/all-MiniLM-L6-v2"), device="cpu")
    model.encode(data[: args.batch], batch_size=args.batch)
    reference = None
    st_runs, kiln_runs, labels, closeness = [], {c: [] for c in args.configs}, {}, {}
    peers = {} if args.no_openvino else {
        "OpenVINO (defaults)": openvino_encoder(None),
        "OpenVINO (f32 precision hint)": openvino_encoder("f32"),
    }
    for encode in peers.values():
        encode(data[: args.batch], args.batch)
    peer_runs = {name: [] for name in peers}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = pathlib.Path(tmp) / "texts.txt", pathlib.Path(tmp) / "out.jsonl"
        inp.write_text("\n".join(data) + "\n")
        for r in range(args.rounds):
            start = time.perf_counter()
            reference = model.encode(data, batch_size=args.batch)
            st_runs.append(len(data) / (time.perf_counter() - start))
            for name, encode in peers.items():
                start = time.perf_counter()
                rows = encode(data, args.batch)
                peer_runs[name].append(len(data) / (time.perf_counter() - start))
                closeness[name] = cosines(rows, reference)
            for config in args.configs:
                tps, labels[config], rows = run_kiln(config, pathlib.Path(args.binary), inp, out, args.batch)
                kiln_runs[config].append(tps)
                closeness[config] = cosines(rows, reference)
            print(f"round {r + 1}: sentence-transformers {st_runs[-1]:.1f}, "
                  + "".join(f"{name} {runs[-1]:.1f}, " for name, runs in peer_runs.items())
                  + ", ".join(f"{pathlib.Path(c).name} {kiln_runs[c][-1]:.1f}" for c in args.configs)
                  + " texts/s", file=sys.stderr)

    words = [len(t.split()) for t in data]
    tokens = [len(ids) for ids in model.tokenizer(data, truncation=True, max_length=model.max_seq_length)["input_ids"]]
    st = statistics.median(st_runs)
    print(f"{len(data)} texts of 5-200 words ({statistics.mean(words):.0f} spaced words, {statistics.mean(tokens):.0f} tokens on average "
          f"after truncation to {model.max_seq_length}), batch {args.batch}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; medians of {args.rounds} alternated runs")
    if peers:
        import openvino
        print(f"OpenVINO {openvino.__version__} on {root / '.kiln/models/all-MiniLM-L6-v2-onnx/model.onnx'}")
    ov = statistics.median(peer_runs["OpenVINO (defaults)"]) if peers else None
    print(f"{'':50} {'texts/s':>8} {'x s-t':>6} {'x OV':>6}  cosine to sentence-transformers (worst / mean)")
    rows = [("sentence-transformers (cpu, f32)", st, None)]
    rows += [(name, statistics.median(runs), name) for name, runs in peer_runs.items()]
    rows += [(f"kiln {pathlib.Path(c).name} ({labels[c]})", statistics.median(kiln_runs[c]), c) for c in args.configs]
    for name, tps, key in rows:
        versus = f"{tps / ov:6.2f}" if ov else f"{'-':>6}"
        close = "{:.6f} / {:.6f}".format(*closeness[key]) if key else ""
        print(f"{name:50} {tps:8.1f} {tps / st:6.2f} {versus}  {close}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
