"""The files a Hugging Face / sentence-transformers model folder serves with besides its
weights (config, tokenizer, pooling), copied by the scripts that write a new folder from
an old one: export_bert_onnx.py, trace_bert_torchscript.py, device/make_small_model.py.
"""
import pathlib
import shutil

SERVING_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]


def copy_serving_files(src, out, skip=()):
    """Copies each of SERVING_FILES that `src` has (but those in `skip`), and 1_Pooling/."""
    src, out = pathlib.Path(src), pathlib.Path(out)
    for name in SERVING_FILES:
        if name not in skip and (src / name).is_file():
            shutil.copy(src / name, out / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
