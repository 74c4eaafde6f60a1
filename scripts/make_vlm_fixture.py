#!/usr/bin/env python3
"""Builds the Qwen2.5-VL fixture kiln's vision-language tests check against (issue 29).

No package on the registries ships real Qwen2.5-VL weights, so the reference is
transformers' own implementation on a small random configuration of the same
architecture, seeded: what kiln computes from the folder must equal what transformers
computes from it. `scripts/setup vlm` runs this once, into .kiln/models/qwen25vl-tiny:

    OUT/model/               a checkpoint folder as transformers' save_pretrained writes it:
                             config.json, model.safetensors (f32), tokenizer.json,
                             tokenizer_config.json, chat_template.json,
                             preprocessor_config.json, generation_config.json
    OUT/images/*.png|jpg     "photos": smooth shapes, gradients and noise, of several
                             sizes and aspect ratios (one under min_pixels)
    OUT/processor.json       per case: image, min/max pixels, grid_thw
    OUT/processor/*.npy      per case: pixel_values (float32 [patches, 1176])
    OUT/prompt.json          the "Compare these images." prompt: messages, the rendered
                             text, input_ids, image_grid_thw, 32 greedy tokens
    OUT/prompt_logits.npy    float32 [prompt tokens, vocab]: logits at every position
    OUT/prompt_pixels.npy    the prompt's pixel_values

Usage: python scripts/make_vlm_fixture.py OUT   (transformers 4.57.6, torch 2.11, PIL)
"""
import json
import pathlib
import sys

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast,
                          Qwen2VLImageProcessor)

SEED = 29
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = """Compare these images. The first shows a red circle on a blue field; the second a
green square beside a yellow sun. Describe what is the same and what differs. A photo of a
mountain lake at dawn, mist over the water, pine trees along the shore. Two cats sleep on a
sofa. The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100.
What colour is the sky? It is blue. Which image is brighter? The left one is brighter."""


def tokenizer(out: pathlib.Path) -> Qwen2TokenizerFast:
    """A byte-level BPE trained on the spot, with Qwen's special tokens as added tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 20, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    return fast


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Something with the statistics of a photo: smooth gradients, soft shapes, grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[..., c] = 128 + 90 * np.sin(a * x / width * 6 + b * y / height * 6 + c)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * max(width, height)
        color = rng.uniform(0, 255, 3)
        mask = np.clip(1.5 - np.hypot(x - cx, y - cy) / r, 0, 1)[..., None]
        img = img * (1 - mask) + color * mask
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    model_dir, image_dir, proc_dir = out / "model", out / "images", out / "processor"
    for d in (model_dir, image_dir, proc_dir):
        d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    # Photos of several sizes and aspect ratios; one under min_pixels (40x30).
    shapes = {"landscape": (640, 480), "portrait": (300, 533), "wide": (1000, 250), "square": (224, 224),
              "tiny": (40, 30), "odd": (333, 217)}
    names = []
    for i, (name, (w, h)) in enumerate(shapes.items()):
        photo(w, h, SEED + i).save(image_dir / f"{name}.png")
        names.append(f"{name}.png")
    photo(512, 384, SEED + 99).save(image_dir / "photo.jpg", quality=90)
    names.append("photo.jpg")

    # The processor with Qwen2.5-VL's own settings (min 3136, max 12845056) on every
    # image, and with a user's lower max_pixels on the larger ones.
    cases = []
    settings = [("default", 3136, 12845056), ("max_pixels_50176", 3136, 50176)]
    for label, lo, hi in settings:
        proc = Qwen2VLImageProcessor(min_pixels=lo, max_pixels=hi)
        for name in names:
            image = Image.open(image_dir / name).convert("RGB")
            got = proc(images=[image], return_tensors="np")
            key = f"{label}-{pathlib.Path(name).stem}"
            np.save(proc_dir / f"{key}.npy", got["pixel_values"].astype(np.float32))
            cases.append({"case": key, "image": name, "min_pixels": lo, "max_pixels": hi,
                          "grid_thw": got["image_grid_thw"][0].tolist()})
    (out / "processor.json").write_text(json.dumps(cases, indent=1))

    # The model: a small random configuration of the real architecture. Matrices at a
    # larger scale than the init's 0.02, so greedy tokens vary and change with the images.
    tok = tokenizer(model_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    vocab = len(tok)
    config = Qwen2_5_VLConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=4096, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": 4, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4,
                       "in_chans": 3, "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1, 3],
                       "hidden_act": "silu", "tokens_per_second": 2},
        torch_dtype="float32",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25 if "embed" not in name else 1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.uniform_(0.8, 1.2)
    model.save_pretrained(model_dir, safe_serialization=True)
    preprocessor = {"min_pixels": 3136, "max_pixels": 50176, "patch_size": 14, "temporal_patch_size": 2,
                    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))

    # The prompt: two images of different sizes and a question, as a user sends it.
    messages = [{"role": "user", "content": [{"type": "image", "path": "images/landscape.png"},
                                             {"type": "image", "path": "images/portrait.png"},
                                             {"type": "text", "text": "Compare these images."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    proc = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=50176)
    images = [Image.open(image_dir / p).convert("RGB") for p in ("landscape.png", "portrait.png")]
    vision = proc(images=images, return_tensors="pt")
    grids = vision["image_grid_thw"]
    expanded, index = text, 0
    while "<|image_pad|>" in expanded:
        n = int(grids[index].prod()) // 4
        expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
        index += 1
    expanded = expanded.replace("<|placeholder|>", "<|image_pad|>")
    input_ids = tok(expanded, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=vision["pixel_values"], image_grid_thw=grids).logits[0]
        # 32 greedy tokens, decoded with the KV cache as transformers does (positions
        # after the prompt: cache position + the prompt's rope delta); end tokens do not
        # stop it (random weights may pick one).
        model.generation_config.eos_token_id = None
        generated = model.generate(input_ids=input_ids, pixel_values=vision["pixel_values"],
                                   image_grid_thw=grids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=32, do_sample=False, pad_token_id=ids["<|endoftext|>"])
    new = generated[0, input_ids.shape[1]:].tolist()
    assert len(new) == 32, new
    np.save(out / "prompt_logits.npy", logits.float().numpy())
    np.save(out / "prompt_pixels.npy", vision["pixel_values"].float().numpy())
    (out / "prompt.json").write_text(json.dumps({
        "messages": messages, "text": text, "input_ids": input_ids[0].tolist(),
        "image_grid_thw": grids.tolist(), "greedy_tokens": new, "greedy_text": tok.decode(new),
        "vocab": vocab, "special_ids": ids}, indent=1))
    print(f"wrote {out}: vocab {vocab}, prompt {input_ids.shape[1]} tokens, grids {grids.tolist()}, "
          f"greedy {new[:8]}...")


if __name__ == "__main__":
    main()
