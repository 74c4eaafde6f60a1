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


def table(out: pathlib.Path) -> None:
    hf = json.loads((out / "transformers.json").read_text())
    print(f"transformers {hf['transformers']} (torch {hf['torch']}, {hf['gpu']}), bf16, sdpa: "
          f"time to first token {hf['ttft_ms']:.0f} ms, decode {hf['decode_tokens_per_s']:.1f} tokens/s "
          f"({hf['prompt_tokens']} prompt tokens; runs {[round(r['ttft_ms']) for r in hf['runs']]} ms)")
    for name in ("kiln_bf16", "kiln_q4", "kiln_q4_8"):
        path = out / f"{name}.json"
        if not path.is_file():
            print(f"{name}: no result")
            continue
        b = json.loads(path.read_text())
        one = b["single_stream"]
        decode = 1e3 / one["inter_token_ms"]["p50"]
        line = f"{name}: 1 stream decode {decode:.1f} tokens/s ({decode / hf['decode_tokens_per_s']:.2f}x transformers)"
        if "image_cache" in b:
            c = b["image_cache"]
            line += (f"; time to first token {c['first_ttft_ms']:.0f} ms ({hf['ttft_ms'] / c['first_ttft_ms']:.2f}x "
                     f"transformers), asked again {c['repeat_ttft_ms']:.0f} ms ({c['ratio']:.2f}x the first)")
        line += f"; {b['concurrency']} streams / 1: {b['ratio']:.2f}x aggregate tokens/s"
        print(line)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        build(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
    elif cmd == "transformers":
        print(json.dumps(transformers_run(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4]))))
    elif cmd == "table":
        table(pathlib.Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
