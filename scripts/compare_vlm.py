#!/usr/bin/env python3
"""kiln against transformers and mlx-vlm on a Qwen2.5-VL of the 3B's shapes (issue 29).

No registry ships real Qwen2.5-VL weights, so this builds (once, cached) a checkpoint of
Qwen2.5-VL-3B-Instruct's exact configuration with random weights — 36 decoder layers of
width 2048 (16 heads, 2 KV heads, MLP 11008), the 32-block vision tower of width 1280,
vocabulary 151936, tied embeddings — saved by transformers in bf16, and converts it with
mlx-vlm's own converter to mlx-community's 4-bit layout. Then, one after another on the
same machine, the same 2-image "Compare these images." prompt (the fixture's landscape
and portrait photos):

    transformers 4.57.6, torch CPU, f32 and bf16      on the bf16 checkpoint
    mlx-vlm 0.7.10 on mlx-cpu                          on the 4-bit checkpoint
    kiln (kiln bench, candle CPU)                      on both

Each is warmed up on two other images first, then measured: time to first token (image
files read, processed, encoded, prompt prefilled: what a user waits for), decode tokens/s
after it (the first token to the last, `--tokens` of them), and the process's peak RSS.
kiln's bench also asks the same images again (image cache) and, with `--concurrency 8`,
runs 8 one-image prompts at once against one at a time.

Usage (after `scripts/setup vlm` and `cargo build --release -p kiln-cli`):

    python3 scripts/compare_vlm.py [--kiln target/release/kiln] [--tokens 16] [--json out.json]

Needs about 16 GB of memory (transformers f32) and 10 GB of disk for the checkpoints
(.kiln/models/qwen25vl-3b/). Writes a table to stdout and, with --json, every figure.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / ".kiln/models/qwen25vl-tiny"
HF_PY = ROOT / ".kiln/vlm/bin/python"
MLX_PY = ROOT / ".kiln/mlxvlm/bin/python"
IMAGES = ["landscape.png", "portrait.png"]
WARMUP_IMAGES = ["square.png", "odd.png"]
QUESTION = "Compare these images."
VOCAB = 151936
MAX_PIXELS = 100352  # 128 image tokens at most per image


# ---------------------------------------------------------------- run inside .kiln/vlm


def build(out: pathlib.Path) -> None:
    """The 3B-shaped checkpoint with random weights, bf16, in transformers' layout."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_vlm_fixture as fixture

    out.mkdir(parents=True, exist_ok=True)
    tok = fixture.tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in fixture.SPECIALS}
    # The trained BPE has a few hundred tokens; the model's vocabulary is the 3B's. Filler
    # entries make every id the model can emit decodable (they are never produced by
    # encoding); the last one is the end token, which random weights almost never pick.
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in spec["added_tokens"]}
    for i in range(VOCAB):
        if i not in taken:
            vocab[f"fill{i}"] = i
    Tokenizer.from_str(json.dumps(spec)).save(str(out / "tokenizer.json"))
    eos = VOCAB - 1
    config = Qwen2_5_VLConfig(
        vocab_size=VOCAB, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=128000, tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                       "hidden_act": "silu", "tokens_per_second": 2},
        torch_dtype="bfloat16",
    )
    torch.manual_seed(29)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    preprocessor = {"min_pixels": 3136, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


class FirstToken:
    """A transformers streamer noting when each generated token arrives."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_run(folder: pathlib.Path, dtype: str, tokens: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    # int8: torch's own dynamic quantization of every nn.Linear (int8 weights per output
    # channel, activations quantized per call, fbgemm's kernels) on the f32 model — the
    # int8 a transformers user on a CPU reaches for, beside kiln's int8.
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}[dtype]
    t = time.perf_counter()
    # (int8: loaded in bf16 and quantized one layer at a time — the f32 model beside
    # its int8 copy does not fit in 24 GiB.)
    load_dtype = torch.bfloat16 if dtype == "int8" else torch_dtype
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=load_dtype).eval()
    if dtype == "int8":
        from torch.ao.quantization import quantize_dynamic

        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    one = quantize_dynamic(torch.nn.Sequential(child.float()), {torch.nn.Linear}, dtype=torch.qint8)
                    setattr(module, name, one[0])
        model.float()  # the rest (norms, embeddings, the patch convolution) in f32
    # The tokenizer and the image processor, with the pad expansion Qwen2_5_VLProcessor
    # does (AutoProcessor would also want torchvision for video, which is not installed).
    tok = AutoTokenizer.from_pretrained(folder)
    images_processor = Qwen2VLImageProcessor.from_pretrained(folder)
    load_s = time.perf_counter() - t

    def ask(names, n):
        start = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"} for _ in names] + [{"type": "text", "text": QUESTION}]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [Image.open(TINY / "images" / n).convert("RGB") for n in names]
        vision = images_processor(images=images, return_tensors="pt")
        grids = vision["image_grid_thw"]
        for g in grids:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(g.prod()) // 4), 1)
        ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
        streamer = FirstToken()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=vision["pixel_values"].to(torch_dtype), image_grid_thw=grids,
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        return start, streamer.times, int(ids.shape[1])

    ask(WARMUP_IMAGES, 2)
    start, times, prompt = ask(IMAGES, tokens)
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": len(times), "prompt_tokens": prompt, "load_s": load_s, "torch": torch.__version__}


# ------------------------------------------------------------- run inside .kiln/mlxvlm


def convert(source: pathlib.Path, out: pathlib.Path) -> None:
    from mlx_vlm.convert import convert as mlx_convert

    mlx_convert(str(source), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)


def mlx_run(folder: pathlib.Path, tokens: int, text_only: bool = False) -> dict:
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load, stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    t = time.perf_counter()
    model, processor = load(str(folder))
    load_s = time.perf_counter() - t

    def ask(names, n):
        start = time.perf_counter()
        prompt = apply_chat_template(processor, model.config, QUESTION, num_images=len(names))
        times, prompt_tokens = [], 0
        images = [str(TINY / "images" / x) for x in names] or None
        for r in stream_generate(model, processor, prompt, image=images, max_tokens=n, temperature=0.0):
            times.append(time.perf_counter())
            prompt_tokens = r.prompt_tokens
        return start, times, prompt_tokens

    if text_only:  # decode speed alone: the question without images
        ask([], 2)
        start, times, prompt = ask([], tokens)
    else:
        ask(WARMUP_IMAGES, 2)
        start, times, prompt = ask(IMAGES, tokens)
    return {"ttft_ms": (times[0] - start) * 1e3, "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "tokens": len(times), "prompt_tokens": prompt, "load_s": load_s,
            "mlx_vlm": mlx_vlm.__version__, "mlx": mx.__version__}


# ------------------------------------------------------------------------ the driver


def child(python: pathlib.Path, *args: str, env=None, timeout: float | None = None) -> tuple:
    """Runs this script's `args` under `python`; (its JSON result or None, peak RSS MiB).
    Past `timeout` seconds the child is killed and the result is `{"timed_out_s": timeout}`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        proc = subprocess.Popen([str(python), __file__, *args, "--result", result.name], env=env)
        started = time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if timeout else 0)
            if pid:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                return {"timed_out_s": timeout}, usage.ru_maxrss / 1024
            time.sleep(1)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(args)} failed (exit {os.waitstatus_to_exitcode(status)})")
        text = pathlib.Path(result.name).read_text()
        return (json.loads(text) if text else None), usage.ru_maxrss / 1024


OPENBLAS = ROOT / ".kiln/mlx/blas/libopenblas.so.0"


def no_mlx_library_path(openblas: bool = False) -> dict:
    """mlx-vlm runs with the wheel's libmlx, not .kiln/mlx's. The mlx-cpu wheel links
    netlib's reference BLAS (one thread, no blocking) for its float matrix products; with
    `openblas`, Debian's OpenBLAS (`scripts/setup mlx`) is preloaded ahead of it, which
    is mlx-vlm at its fastest on this CPU."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if openblas:
        assert OPENBLAS.exists(), f"{OPENBLAS} is missing: run scripts/setup mlx"
        env["LD_PRELOAD"] = str(OPENBLAS)
        env["LD_LIBRARY_PATH"] = str(OPENBLAS.parent)  # its libgfortran
    return env


def kiln_run(kiln: str, folder: pathlib.Path, tokens: int, concurrency: int, prompts: pathlib.Path | None,
             extra: tuple = ()) -> tuple:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [kiln, "bench", str(ROOT / "examples/vlm.toml"), "--set", f"model.path={folder}",
               "--set", f"generate.max_new_tokens={tokens}", "--set", "generate.image_cache_mb=64",
               "--requests", str(max(concurrency, 2)), "--concurrency", str(concurrency), "--json", out.name]
        if prompts:
            cmd += ["--texts", str(prompts)]
        cmd += list(extra)
        print("+", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"kiln bench failed (exit {os.waitstatus_to_exitcode(status)})")
        return json.loads(pathlib.Path(out.name).read_text()), usage.ru_maxrss / 1024


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def mlx_name(r: dict) -> str:
    """mlx-vlm's row name, with the versions its run reported (none when it was stopped)."""
    if "mlx_vlm" not in r:
        return "mlx-vlm (mlx-cpu, OpenBLAS)"
    return f"mlx-vlm {r['mlx_vlm']} (mlx-cpu {r.get('mlx')}, OpenBLAS)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", default=str(ROOT / "target/release/kiln"))
    ap.add_argument("--out", default=str(ROOT / ".kiln/models/qwen25vl-3b"))
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json")
    ap.add_argument("--kiln-q4-only", action="store_true", help="with --only kiln: the 4-bit folder only")
    ap.add_argument("--only", action="append", default=[],
                    help="run only these (repeatable): transformers-f32, transformers-bf16, transformers-int8 (torch's "
                         "dynamic int8 quantization of every nn.Linear), mlx-vlm, mlx-vlm-text "
                         "(its decode speed on the question alone), kiln, kiln-amx (the bf16 file with "
                         "model.dtype = \"bf16\": AMX tiles), kiln-q4-int8 (the 4-bit folder with "
                         "model.quantization = \"int8\": GGML Q4_1 blocks, int8 activations), kiln-int8 (the bf16 file with "
                         "model.quantization = \"int8\": int8 per output channel, int8 activations, AMX int8 tiles); "
                         "with --json, figures already in the file are kept and the table shows them all")
    ap.add_argument("--mlx-timeout", type=float, default=1200,
                    help="seconds after which an mlx-vlm run is stopped and recorded as giving no first token "
                         "(on mlx-cpu it gave none in 18 min on the 2-core machine)")
    ap.add_argument("--internal", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.internal:  # a child: do one thing, write its JSON
        what, *rest = args.internal
        result = None
        if what == "build":
            build(pathlib.Path(rest[0]))
        elif what == "convert":
            convert(pathlib.Path(rest[0]), pathlib.Path(rest[1]))
        elif what == "transformers":
            result = transformers_run(pathlib.Path(rest[0]), rest[1], int(rest[2]))
        elif what == "mlx":
            result = mlx_run(pathlib.Path(rest[0]), int(rest[1]))
        elif what == "mlx-text":
            result = mlx_run(pathlib.Path(rest[0]), int(rest[1]), text_only=True)
        pathlib.Path(args.result).write_text(json.dumps(result) if result is not None else "")
        return

    out = pathlib.Path(args.out)
    hf, q4 = out / "bf16", out / "mlx-q4"
    if not (hf / "config.json").is_file():
        print(f"building the 3B-shaped checkpoint in {hf} (once)", flush=True)
        child(HF_PY, "--internal", "build", str(hf))
    if not (q4 / "config.json").is_file():
        print(f"converting it to 4 bits with mlx-vlm in {q4} (once)", flush=True)
        child(MLX_PY, "--internal", "convert", str(hf), str(q4), env=no_mlx_library_path())

    figures = {}
    if args.json and pathlib.Path(args.json).is_file():
        figures = json.loads(pathlib.Path(args.json).read_text())
    figures.update({"tokens": args.tokens, "images": IMAGES, "max_pixels": MAX_PIXELS,
                    "bytes": {"bf16": folder_bytes(hf), "mlx-q4": folder_bytes(q4)}})
    wanted = lambda name: not args.only or name in args.only  # noqa: E731

    def save():
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")

    for dtype in ("f32", "bf16", "int8"):
        if not wanted(f"transformers-{dtype}"):
            continue
        r, rss = child(HF_PY, "--internal", "transformers", str(hf), dtype, str(args.tokens))
        r["peak_rss_mib"] = rss
        figures[f"transformers-{dtype}"] = r
        save()
    if wanted("mlx-vlm"):
        r, rss = child(MLX_PY, "--internal", "mlx", str(q4), str(args.tokens), env=no_mlx_library_path(True),
                       timeout=args.mlx_timeout)
        r["peak_rss_mib"] = rss
        r["blas"] = "OpenBLAS (preloaded)"
        figures["mlx-vlm"] = r
        save()
    if wanted("mlx-vlm-text"):
        r, rss = child(MLX_PY, "--internal", "mlx-text", str(q4), str(args.tokens), env=no_mlx_library_path(True),
                       timeout=args.mlx_timeout)
        r["peak_rss_mib"] = rss
        figures["mlx-vlm-text"] = r
        save()

    def kiln_figures(bench: dict, rss: float) -> dict:
        one = bench["single_stream"]
        return {"ttft_ms": bench["image_cache"]["first_ttft_ms"], "repeat_ttft_ms": bench["image_cache"]["repeat_ttft_ms"],
                "decode_tokens_per_s": 1e3 / one["inter_token_ms"]["p50"],
                "image_tokens": bench["image_cache"]["image_tokens"], "peak_rss_mib": rss, "bench": bench}

    tmp = tempfile.TemporaryDirectory()
    prompts = pathlib.Path(tmp.name) / "prompts.jsonl"
    content = [{"type": "image", "path": str(TINY / "images" / n)} for n in IMAGES]
    content.append({"type": "text", "text": QUESTION})
    prompts.write_text(json.dumps({"id": "compare", "messages": [{"role": "user", "content": content}]}) + "\n")
    if wanted("kiln-amx"):
        bench, rss = kiln_run(args.kiln, hf, args.tokens, 1, prompts, ("--set", 'model.dtype="bf16"'))
        figures["kiln-bf16-amx"] = kiln_figures(bench, rss)
        save()
    if wanted("kiln-int8"):
        bench, rss = kiln_run(args.kiln, hf, args.tokens, 1, prompts, ("--set", 'model.quantization="int8"'))
        figures["kiln-int8"] = kiln_figures(bench, rss)
        save()
    if wanted("kiln-q4-int8"):
        bench, rss = kiln_run(args.kiln, q4, args.tokens, 1, prompts, ("--set", 'model.quantization="int8"'))
        figures["kiln-q4-int8"] = kiln_figures(bench, rss)
        save()
    if wanted("kiln"):
        for label, folder in (("bf16 file", hf), ("4-bit", q4)):
            if args.kiln_q4_only and folder == hf:
                continue
            bench, rss = kiln_run(args.kiln, folder, args.tokens, 1, prompts)
            figures[f"kiln-{'bf16' if folder == hf else 'q4'}"] = kiln_figures(bench, rss)
            save()
        bench, rss = kiln_run(args.kiln, q4, args.tokens, 8, None)
        figures["kiln-q4-8-streams"] = {"bench": bench, "peak_rss_mib": rss}
        save()

    rows = []
    for key, weights in (("transformers-f32", "bf16 file, run in f32"), ("transformers-bf16", "bf16 file"),
                         ("transformers-int8", "bf16 file, torch dynamic int8 (every nn.Linear)"),
                         ("mlx-vlm", "4-bit"), ("mlx-vlm-text", "4-bit, the question alone"),
                         ("kiln-bf16", "bf16 file"), ("kiln-q4", "4-bit"),
                         ("kiln-bf16-amx", "bf16 file, model.dtype = \"bf16\" (AMX)"),
                         ("kiln-q4-int8", "4-bit, model.quantization = \"int8\" (Q4_1 blocks)"),
                         ("kiln-int8", "bf16 file, model.quantization = \"int8\" (int8 per channel)")):
        if key in figures:
            r = figures[key]
            name = {"transformers-f32": f"transformers (torch {r.get('torch')}) f32",
                    "transformers-bf16": f"transformers (torch {r.get('torch')}) bf16",
                    "transformers-int8": f"transformers (torch {r.get('torch')}) int8",
                    "mlx-vlm": mlx_name(r),
                    "mlx-vlm-text": mlx_name(r),
                    }.get(key, "kiln (candle, CPU)")
            rows.append((name, weights, r))

    print(f"\nQwen2.5-VL-3B shapes, random weights; 2 images ({', '.join(IMAGES)}, max_pixels {MAX_PIXELS}), "
          f"\"{QUESTION}\", {args.tokens} tokens\n")
    print("| implementation | weights | time to first token (ms) | decode tokens/s | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|")
    for name, weights, r in rows:
        if "timed_out_s" in r:
            print(f"| {name} | {weights} | none in {r['timed_out_s']:.0f} s (stopped) | – | {r['peak_rss_mib']:.0f} |")
            continue
        print(f"| {name} | {weights} | {r['ttft_ms']:.0f} | {r['decode_tokens_per_s']:.2f} | {r['peak_rss_mib']:.0f} |")

    def best(prefix):
        """The peer's best time to first token (2-image runs only) and decode rate."""
        c = [(k, v) for k, v in figures.items() if k.startswith(prefix) and isinstance(v, dict) and "ttft_ms" in v]
        ttft = [v["ttft_ms"] for k, v in c if not k.endswith("-text")]
        return (min(ttft) if ttft else None, max(v["decode_tokens_per_s"] for _, v in c)) if c else None

    ratios = {}
    for kiln_key, peer in (("kiln-bf16", "transformers"), ("kiln-q4", "transformers"), ("kiln-q4", "mlx-vlm"),
                           ("kiln-bf16-amx", "transformers"), ("kiln-q4-int8", "transformers"),
                           ("kiln-int8", "transformers")):
        k, p = figures.get(kiln_key), best(peer)
        if k and p:
            ttft = p[0] / k["ttft_ms"] if p[0] else None
            ratios[f"{kiln_key} vs {peer}"] = {"ttft": ttft, "decode": k["decode_tokens_per_s"] / p[1]}
            ttft_text = f"{ttft:.2f}×" if ttft else "not measured"
            print(f"\n{kiln_key} against the faster {peer}: time to first token {ttft_text}, "
                  f"decode {k['decode_tokens_per_s'] / p[1]:.2f}×")
    if "kiln-q4" in figures:
        k = figures["kiln-q4"]
        print(f"kiln 4-bit, the same images again: time to first token {k['repeat_ttft_ms']:.0f} ms, "
              f"{k['repeat_ttft_ms'] / k['ttft_ms']:.2f}× the first time")
        budget = figures["bytes"]["mlx-q4"] / 2**20 + 64
        print(f"kiln 4-bit peak RSS {k['peak_rss_mib']:.0f} MiB = {k['peak_rss_mib'] / budget:.2f}× "
              f"(file {figures['bytes']['mlx-q4'] / 2**20:.0f} MiB + image cache 64 MiB; KV below 30 MiB)")
    if "kiln-q4-8-streams" in figures:
        b = figures["kiln-q4-8-streams"]["bench"]
        print(f"kiln 4-bit, 8 one-image prompts at once: {b['ratio']:.2f}× the aggregate tokens/s of one at a time")
    figures["ratios"] = ratios
    save()


if __name__ == "__main__":
    main()
