#!/usr/bin/env python3
"""Issue 29 on the GPU machine: Qwen2.5-VL at the 3B's shapes with random weights.

    vlm_gpu.py build CONFIG_DIR OUT        OUT/bf16: transformers' random model of CONFIG_DIR/config.json
                                           (seeded, bf16, save_pretrained); OUT/q4: the same weights in
                                           mlx-community's 4-bit layout (the language model's linear layers
                                           and embedding packed, group 64; the vision tower bf16, as
                                           mlx-vlm's converter leaves it)
    vlm_gpu.py transformers FOLDER IMAGES TOKENS
                                           transformers' generate on cuda:0, bf16: warmed up on two other
                                           images, then the 2-image "Compare these images." prompt: time to
                                           first token (files read, processed, encoded, prefilled) and decode
                                           tokens/s, as JSON on stdout
    vlm_gpu.py mlxvlm FOLDER IMAGES TOKENS the same with mlx-vlm's load and stream_generate on MLX's GPU
                                           (bf16 compute; a packed folder as stored)
    vlm_gpu.py table OUT                   the summary of OUT/*.json

The 4-bit packing is MLX's affine layout (element j of a row at bits 4j.. of its u32 words,
w = scale * q + bias per group of 64) with plain min/max scales: the figures are about speed;
kiln's agreement with mlx-vlm's own conversions is tested on the 2-core machine.
"""
import json
import pathlib
import sys
import time

IMAGES = ["landscape.png", "portrait.png"]
WARMUP = ["square.png", "odd.png"]
QUESTION = "Compare these images."


def build(config_dir: pathlib.Path, out: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t = time.perf_counter()
    config = Qwen2_5_VLConfig.from_pretrained(config_dir)
    torch.manual_seed(29)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, torch_dtype=torch.bfloat16).eval()
    hf = out / "bf16"
    model.save_pretrained(hf, safe_serialization=True, max_shard_size="2GB")
    del model
    print(f"bf16 checkpoint in {time.perf_counter() - t:.0f} s", flush=True)

    q4 = out / "q4"
    q4.mkdir(parents=True, exist_ok=True)
    index = hf / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weight_map = {}
    for shard in shards:
        tensors = load_file(hf / shard, device=device)
        packed = {}
        for name, w in tensors.items():
            text = "visual" not in name and "vision_tower" not in name
            linear = name.endswith("proj.weight") and w.dim() == 2
            if text and (linear or name.endswith("embed_tokens.weight")) and w.shape[1] % 64 == 0:
                rows, cols = w.shape
                g = w.float().reshape(rows, cols // 64, 64)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = ((hi - lo) / 15).clamp_min(1e-8)
                q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int64).reshape(rows, cols // 8, 8)
                shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
                words = (q << shifts).sum(-1).to(torch.int64)
                # The u32 words' bits in an int32 tensor, written as U32 (`write_safetensors`).
                words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
                base = name[: -len(".weight")]
                packed[name] = words.cpu()
                packed[f"{base}.scales"] = scale.squeeze(-1).to(torch.bfloat16).cpu()
                packed[f"{base}.biases"] = lo.squeeze(-1).to(torch.bfloat16).cpu()
            else:
                packed[name] = w.cpu()
        write_safetensors(q4 / shard, packed)
        weight_map.update({n: shard for n in packed})
        print(f"{shard}: {len(packed)} tensors", flush=True)
    (q4 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (q4 / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in hf.iterdir():
        if not f.name.endswith(".safetensors") and f.name not in ("config.json", "model.safetensors.index.json"):
            (q4 / f.name).write_bytes(f.read_bytes())
    sizes = {k: sum(p.stat().st_size for p in (out / k).glob("*.safetensors")) for k in ("bf16", "q4")}
    (out / "sizes.json").write_text(json.dumps(sizes))
    print(f"checkpoints in {time.perf_counter() - t:.0f} s: {sizes}", flush=True)


def write_safetensors(path: pathlib.Path, tensors: dict) -> None:
    """safetensors' layout written directly (int32 tensors as U32: the packed words)."""
    import struct

    import torch

    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "U32",
             torch.int64: "I64"}
    header, blobs, at = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(data)]}
        blobs.append(data)
        at += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


class Times:
    """A transformers streamer noting when each generated token reaches the host."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        value.tolist()  # waits for the GPU
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_run(folder: pathlib.Path, images_dir: pathlib.Path, tokens: int) -> dict:
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    processor = Qwen2VLImageProcessor.from_pretrained(folder)

    def ask(names, n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"} for _ in names] + [{"type": "text", "text": QUESTION}]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [Image.open(images_dir / n).convert("RGB") for n in names]
        vision = processor(images=images, return_tensors="pt")
        grids = vision["image_grid_thw"]
        for g in grids:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(g.prod()) // 4), 1)
        ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"].cuda()
        streamer = Times()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           pixel_values=vision["pixel_values"].to("cuda", torch.bfloat16), image_grid_thw=grids.cuda(),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        return start, streamer.times, int(ids.shape[1])

    ask(WARMUP, 4)
    runs = []
    for _ in range(3):
        start, times, prompt = ask(IMAGES, tokens)
        runs.append({"ttft_ms": (times[0] - start) * 1e3,
                     "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]), "prompt_tokens": prompt})
    best = min(runs, key=lambda r: r["ttft_ms"])
    return {"runs": runs, "ttft_ms": best["ttft_ms"], "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
            "prompt_tokens": best["prompt_tokens"], "tokens": tokens,
            "transformers": transformers.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0)}


def as_transformers_4(folder: pathlib.Path) -> pathlib.Path:
    """`folder` as mlx-vlm 0.7.10 reads a Qwen2.5-VL config: the text model's settings at the top
    level, M-RoPE as `rope_scaling` and the vision tower's model type the model's (transformers
    4's layout; transformers 5 nests the text settings in `text_config`, writes `rope_parameters`
    and names the tower `qwen2_5_vl_vision`) — a folder beside it of links and a rewritten
    config.json."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", {})
    rope = text.get("rope_parameters") or config.get("rope_parameters")
    if not rope or "rope_scaling" in config:
        return folder
    out = folder.parent / f"{folder.name}-transformers4"
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    merged = {**text, **{k: v for k, v in config.items() if k != "text_config"}}
    merged["text_config"] = text
    merged["rope_theta"] = rope.get("rope_theta", 1000000.0)
    merged["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    merged["vision_config"] = {**config["vision_config"], "model_type": config["model_type"]}
    (out / "config.json").write_text(json.dumps(merged, indent=1))
    return out


def mlxvlm_run(folder: pathlib.Path, images_dir: pathlib.Path, tokens: int) -> dict:
    import mlx.core as mx
    import mlx_vlm
    from mlx_vlm import load
    from mlx_vlm.generate.dispatch import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template

    model, processor = load(str(as_transformers_4(folder)))

    def ask(names, n):
        mx.synchronize()
        start = time.perf_counter()
        prompt = apply_chat_template(processor, model.config, QUESTION, num_images=len(names))
        times, last = [], None
        for r in stream_generate(model, processor, prompt, image=[str(images_dir / x) for x in names],
                                 max_tokens=n, temperature=0.0):
            if r.token is not None:  # the last result may only carry the totals
                times.append(time.perf_counter())
            last = r
        return start, times, last

    ask(WARMUP, 4)
    runs = []
    for _ in range(3):
        start, times, last = ask(IMAGES, tokens)
        runs.append({"ttft_ms": (times[0] - start) * 1e3, "tokens": len(times),
                     "decode_tokens_per_s": (len(times) - 1) / max(times[-1] - times[0], 1e-9),
                     "own_generation_tps": last.generation_tps, "prompt_tokens": last.prompt_tokens})
    best = min(runs, key=lambda r: r["ttft_ms"])
    return {"runs": runs, "ttft_ms": best["ttft_ms"], "decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in runs),
            "prompt_tokens": best["prompt_tokens"], "tokens": tokens, "mlx_vlm": mlx_vlm.__version__,
            "mlx": mx.__version__}


def table(out: pathlib.Path) -> None:
    """Time to first token three ways — an engine's (or process's) first request, the same
    prompt again with every cache off (warm), other questions about the same images — and
    decode, for transformers, mlx-vlm and kiln."""
    def load(name):
        path = out / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    hf = load("transformers")
    if hf is None:
        print("transformers: no result")
        return
    runs = [round(r["ttft_ms"]) for r in hf["runs"]]
    print(f"transformers {hf['transformers']} (torch {hf['torch']}, {hf['gpu']}), bf16, sdpa, {hf['prompt_tokens']} "
          f"prompt tokens: time to first token first {runs[0]} ms, warm {hf['ttft_ms']:.0f} ms (runs {runs}); "
          f"decode {hf['decode_tokens_per_s']:.1f} tokens/s")
    for f in ("bf16", "q4"):
        m = load(f"mlxvlm_{f}")
        if m:
            runs = [round(r["ttft_ms"]) for r in m["runs"]]
            print(f"mlx-vlm {m['mlx_vlm']} (mlx {m['mlx']}), {f}: first {runs[0]} ms, warm {m['ttft_ms']:.0f} ms "
                  f"({hf['ttft_ms'] / m['ttft_ms']:.2f}x transformers); decode {m['decode_tokens_per_s']:.1f} tokens/s "
                  f"({m['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x)")
        else:
            print(f"mlx-vlm {f}: no result")
        first, warm, new = load(f"kiln_{f}"), load(f"kiln_{f}_warm"), load(f"kiln_{f}_new")
        if not (first and warm and new):
            print(f"kiln {f}: missing results")
            continue
        decode = 1e3 / first["single_stream"]["inter_token_ms"]["p50"]
        warm_ms = warm["single_stream"]["ttft_ms"]["p50"]
        new_ms = new["single_stream"]["ttft_ms"]["p50"]
        print(f"kiln {f}: first {first['image_cache']['first_ttft_ms']:.0f} ms, warm {warm_ms:.0f} ms "
              f"({hf['ttft_ms'] / warm_ms:.2f}x transformers), another question {new_ms:.0f} ms; "
              f"decode {decode:.1f} tokens/s ({decode / hf['decode_tokens_per_s']:.2f}x transformers)")
    many = load("kiln_q4_8")
    if many:
        print(f"kiln q4, 8 one-image prompts at once: {many['concurrent']['tokens_per_s']:.1f} tokens/s, "
              f"{many['ratio']:.2f}x one stream")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        build(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
    elif cmd == "transformers":
        print(json.dumps(transformers_run(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4]))))
    elif cmd == "mlxvlm":
        print(json.dumps(mlxvlm_run(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4]))))
    elif cmd == "table":
        table(pathlib.Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
