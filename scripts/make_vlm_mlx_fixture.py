#!/usr/bin/env python3
"""Reference for mlx-community's quantized Qwen2.5-VL layout, made with the real mlx-vlm.

Takes the fixture folder that scripts/make_vlm_fixture.py wrote (e.g. .kiln/models/qwen25vl-tiny)
and, with mlx-vlm's own converter and model class, writes beside its model/:

    OUT/mlx-f32/             model/ converted by mlx-vlm without quantization (float32, the
                             source dtype): mlx-vlm's key names and channels-last patch_embed
    OUT/mlx-q{4,6,8}/        model/ converted by mlx-vlm with quantize=True, q_bits=4|6|8,
                             q_group_size=64 (affine), as mlx-community's repos are made:
                             model.safetensors (+ .index.json), config.json with "quantization",
                             and the tokenizer/processor files copied from model/
    OUT/mlx-*/prompt_logits.npy    float32 [prompt tokens, vocab]: mlx-vlm's logits at every
                             position of prompt.json's input_ids + prompt_pixels.npy +
                             image_grid_thw (one forward pass, no cache)
    OUT/mlx-*/reference.json {"bits", "group_size", "greedy_tokens" (32, greedy with mlx-vlm's
                             KV cache via generate_step; end tokens do not stop it),
                             "mlx_vlm_version", "mlx_version", "quantized_modules" (module
                             paths that have a .scales tensor), "quantization" (config.json's
                             entry), "agree_with_transformers" (of the 32), "logits_max_abs_diff_vs_transformers"}

The model is loaded from each converted folder with mlx_vlm.utils.load_model (not the
processor): the inputs are the fixture's own, fed as they are. mlx-vlm's PatchEmbed takes
pixel_values in the same [patches, 1176] (c, t, i, j) flattening as transformers (it reshapes
to [-1, 3, 2, 14, 14] and moves the channel axis last itself), so prompt_pixels.npy is passed
unchanged.

Pinned environment (CPU, Linux x86_64, Python 3.11; no torch):

    python3 -m venv /work/main/.kiln/mlxvlm
    /work/main/.kiln/mlxvlm/bin/pip install mlx==0.32.4 mlx-cpu==0.32.4 mlx-vlm==0.7.10 \
        transformers==5.25.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 \
        huggingface_hub==2.4.0 pillow==13.0.0

(mlx-vlm 0.7.10 pulls transformers 5.25.0, tokenizers 0.23.3, huggingface_hub 2.4.0,
mlx-audio 0.6.2, datasets 5.2.0, opencv-python 5.1.0.95 and more; the pins above are the
ones that matter here.) Run it with LD_LIBRARY_PATH unset, so the wheel's libmlx is used and
not the one `scripts/setup mlx` puts in .kiln/mlx:

    env -u LD_LIBRARY_PATH .kiln/mlxvlm/bin/python scripts/make_vlm_mlx_fixture.py .kiln/models/qwen25vl-tiny
"""
import json
import pathlib
import shutil
import sys

import mlx.core as mx
import numpy as np

import mlx_vlm
from mlx_vlm.convert import convert
from mlx_vlm.generate.ar import generate_step
from mlx_vlm.utils import load_model

GROUP_SIZE = 64
BITS = (4, 6, 8)
NEW_TOKENS = 32


def scaled_modules(folder: pathlib.Path) -> list:
    """Module paths with a .scales tensor in the converted weights: what mlx-vlm's loader
    (get_class_predicate) and so kiln treat as quantized."""
    keys = set()
    for f in sorted(folder.glob("*.safetensors")):
        keys.update(mx.load(str(f)).keys())
    return sorted(k[: -len(".scales")] for k in keys if k.endswith(".scales"))


def reset_rope_state(model) -> None:
    """The language model keeps the last prompt's mRoPE positions and deltas between calls."""
    model.language_model._rope_deltas = None
    model.language_model._position_ids = None


def reference(folder: pathlib.Path, prompt: dict, pixels: np.ndarray, hf_logits: np.ndarray) -> dict:
    model = load_model(folder)  # mlx-vlm's Model class; weights as the converter wrote them
    input_ids = mx.array([prompt["input_ids"]], dtype=mx.int32)
    pixel_values = mx.array(pixels)  # [patches, 1176], transformers' flattening (see above)
    grid_thw = mx.array(prompt["image_grid_thw"], dtype=mx.int32)

    # Logits at every prompt position: one forward pass without cache.
    reset_rope_state(model)
    out = model(input_ids, pixel_values=pixel_values, mask=None, image_grid_thw=grid_thw)
    logits = np.array(out.logits[0].astype(mx.float32))
    np.save(folder / "prompt_logits.npy", logits)

    # Greedy decoding as mlx-vlm generates: generate_step (chunked prefill, KV cache, mRoPE
    # deltas for the positions after the prompt). It has no end-token check of its own (that
    # is stream_generate's), so end tokens do not stop it.
    reset_rope_state(model)
    tokens = []
    for token, _ in generate_step(input_ids, model, pixel_values, None, max_tokens=NEW_TOKENS,
                                  temperature=0.0, image_grid_thw=grid_thw):
        tokens.append(int(token))
        if len(tokens) == NEW_TOKENS:
            break
    assert len(tokens) == NEW_TOKENS, tokens

    config = json.loads((folder / "config.json").read_text())
    agree = sum(a == b for a, b in zip(tokens, prompt["greedy_tokens"]))
    return {"logits": logits, "greedy_tokens": tokens, "quantization": config.get("quantization"),
            "agree_with_transformers": agree,
            "logits_max_abs_diff_vs_transformers": float(np.abs(logits - hf_logits).max())}


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    prompt = json.loads((out / "prompt.json").read_text())
    pixels = np.load(out / "prompt_pixels.npy").astype(np.float32)
    hf_logits = np.load(out / "prompt_logits.npy")
    versions = {"mlx_vlm_version": mlx_vlm.__version__, "mlx_version": mx.__version__}

    runs = [(None, out / "mlx-f32")] + [(b, out / f"mlx-q{b}") for b in BITS]
    for bits, folder in runs:
        if folder.exists():
            shutil.rmtree(folder)
        if bits is None:
            convert(str(out / "model"), mlx_path=str(folder), quantize=False)
        else:
            convert(str(out / "model"), mlx_path=str(folder), quantize=True, q_bits=bits,
                    q_group_size=GROUP_SIZE)
        ref = reference(folder, prompt, pixels, hf_logits)
        doc = {"bits": bits, "group_size": GROUP_SIZE if bits else None,
               "greedy_tokens": ref["greedy_tokens"], **versions,
               "quantized_modules": scaled_modules(folder), "quantization": ref["quantization"],
               "agree_with_transformers": ref["agree_with_transformers"],
               "logits_max_abs_diff_vs_transformers": ref["logits_max_abs_diff_vs_transformers"]}
        (folder / "reference.json").write_text(json.dumps(doc, indent=1))
        print(f"{folder.name}: greedy {ref['greedy_tokens']}\n  {ref['agree_with_transformers']}/32 agree with "
              f"transformers; max |logits - transformers'| {ref['logits_max_abs_diff_vs_transformers']:.4g}; "
              f"{len(doc['quantized_modules'])} quantized modules")


if __name__ == "__main__":
    main()
