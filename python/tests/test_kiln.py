"""The `kiln` Python package against kiln itself and the references the Rust tests use.

Run by scripts/test after `scripts/setup python` (which builds the package into
.kiln/python with maturin): `.kiln/python/bin/pytest python/tests`.
"""
import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kiln

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / ".kiln/models"
EMBED = ROOT / "examples/embed.toml"
GENERATE = ROOT / "examples/generate.toml"
VLM = ROOT / "examples/vlm.toml"
VIDEO = ROOT / "examples/video.toml"


def need(path: pathlib.Path) -> pathlib.Path:
    assert path.exists(), f"{path} is missing: run scripts/setup (scripts/test does)"
    return path


@pytest.fixture(scope="module")
def embedder():
    need(MODELS / "all-MiniLM-L6-v2")
    with kiln.Optimizer(EMBED) as opt:
        yield opt


def reference():
    return json.loads(need(ROOT / "tests/fixtures/minilm_reference.json").read_text())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embed_gives_sentence_transformers_vectors_as_one_float32_array(embedder):
    ref = reference()
    got = embedder.embed(ref["texts"])
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (len(ref["texts"]), 384)
    assert cosines(got, np.array(ref["embeddings"], np.float32)).min() >= 0.9999


def test_encode_has_sentence_transformers_signature_and_semantics(embedder):
    ref = reference()
    texts, want = ref["texts"], np.array(ref["embeddings"], np.float32)
    batch = embedder.encode(texts, batch_size=4, show_progress_bar=False, normalize_embeddings=True)
    assert batch.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert cosines(batch, want).min() >= 0.9999
    one = embedder.encode(texts[0])
    assert one.shape == (384,)
    listed = embedder.encode(texts[:2], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (384,)
    with pytest.raises(TypeError, match="list of texts"):
        embedder.embed("one string")


def test_sentence_transformer_by_hub_id_from_the_cache(tmp_path, monkeypatch):
    """The one-line switch: a model id found in a Hugging Face cache laid out as
    huggingface_hub lays it out."""
    commit = "a" * 40
    folder = tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = folder / "snapshots" / commit
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(need(MODELS / "all-MiniLM-L6-v2"), target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = kiln.SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    ref = reference()
    assert cosines(model.encode(ref["texts"]), np.array(ref["embeddings"], np.float32)).min() >= 0.9999
    model.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # else kiln would try to download it
    with pytest.raises(kiln.KilnError, match="huggingface-cli download org/missing"):
        kiln.SentenceTransformer("org/missing")


def test_the_python_example_embeds_as_kiln_run_does(tmp_path):
    texts = need(ROOT / "examples/data/texts.txt").read_text().splitlines()
    kiln_bin = os.environ.get("KILN_BIN", str(ROOT / "target/debug/kiln"))
    assert pathlib.Path(kiln_bin).is_file(), f"{kiln_bin} is missing: cargo build -p kiln-cli (or set KILN_BIN)"
    out = tmp_path / "run.jsonl"
    subprocess.run([kiln_bin, "run", str(EMBED), "--input", str(ROOT / "examples/data/texts.txt"),
                    "--output", str(out)], check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = np.array([r["embedding"] for r in rows], np.float32)
    with kiln.Optimizer(EMBED) as opt:
        got = opt.embed(texts)
    assert got.shape == want.shape
    assert cosines(got, want).min() >= 0.9999


def test_config_as_a_dict_and_overrides_as_set_does(embedder):
    with kiln.Optimizer({"model": {"path": str(MODELS / "all-MiniLM-L6-v2")}}, batching={"max_batch_size": 4}) as opt:
        assert opt.task == "embed"
        ref = reference()
        assert cosines(opt.embed(ref["texts"][:3]), embedder.embed(ref["texts"][:3])).min() >= 0.99999
    with pytest.raises(ValueError, match="batching.max_batch_size"):
        kiln.Optimizer(EMBED, batching={"max_batch_size": 0})


def test_errors_are_exceptions_with_kilns_message(embedder, tmp_path):
    with pytest.raises(kiln.KilnError) as missing:
        kiln.Optimizer(EMBED, model={"path": str(tmp_path / "nothing-here")})
    assert "nothing-here" in str(missing.value)
    with pytest.raises(ValueError, match="generate"):
        embedder.generate("hello")
    # The optimizer still works after a refused call.
    assert embedder.embed(["still here"]).shape == (1, 384)


def test_async_calls_run_concurrently(embedder):
    async def main():
        return await asyncio.gather(*(embedder.aembed([f"text {i}", "other"]) for i in range(8)))

    results = asyncio.run(main())
    assert len(results) == 8 and all(r.shape == (2, 384) for r in results)
    np.testing.assert_allclose(results[0][1], results[7][1], atol=1e-6)


def test_monitor_spans_and_stats_and_the_profiler_report(embedder):
    with embedder.monitor("image_processing"):
        time.sleep(0.02)
    embedder.embed(["a", "b"])
    stats = embedder.stats()
    assert stats["requests"] >= 1
    report = embedder.report()
    assert report is not None
    spans = json.dumps(report)
    assert "image_processing" in spans, spans[:500]


def test_generate_and_stream_give_the_same_text():
    need(MODELS / "smollm2")
    with kiln.Optimizer(GENERATE, generate={"max_new_tokens": 12}) as opt:
        done = opt.generate("Name a colour.")
        assert done["finish_reason"] in ("stop", "length") and done["text"]
        stream = opt.stream("Name a colour.")
        pieces = list(stream)
        assert "".join(pieces) == done["text"]
        assert stream.result["tokens"] == done["tokens"]
        stats = opt.stats()
        assert stats["requests"] >= 2
        with pytest.raises(ValueError, match="embed"):
            opt.embed(["x"])
        # Shutting down while a stream is open is refused, and the model stays usable.
        open_stream = opt.stream("Count to ten.")
        with pytest.raises(kiln.KilnError, match="still open"):
            opt.shutdown()
        assert opt.generate("Name a colour.")["tokens"] == done["tokens"]
        open_stream.close()


def test_a_vision_language_model_answers_about_files():
    tiny = need(MODELS / "qwen25vl-tiny")
    expected = json.loads((tiny / "prompt.json").read_text())["greedy_tokens"]
    images = [tiny / "images" / "landscape.png", tiny / "images" / "portrait.png"]
    with kiln.Optimizer(VLM, generate={"max_new_tokens": 32}) as opt:
        done = opt.generate(prompt="Compare these images.", files=images)
    assert done["image_tokens"] > 0
    assert done["tokens"] == expected[:len(done["tokens"])] and len(done["tokens"]) >= 1


def test_ctrl_c_interrupts_a_long_call(embedder):
    # Distinct texts: identical ones would come from the result cache in well under the
    # half second before the interrupt.
    texts = [f"text {i}: " + "a long text about models and batches " * 20 for i in range(4000)]
    timer = threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    # Python's own Ctrl-C handler, whatever the process inherited: a job started in the
    # background by a non-interactive shell starts with SIGINT ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            embedder.embed(texts)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert time.monotonic() - started < 10
    assert embedder.embed(["after the interrupt"]).shape == (1, 384)


def test_a_video_config_renders_frames_and_writes_them(tmp_path):
    """task = "video" from Python: 3 keyframes and a RIFE midpoint between each pair,
    returned as float32 frames and written as `kiln run` writes them."""
    need(MODELS / "video" / "terrain_unet.onnx")
    assert os.environ.get("ORT_DYLIB_PATH"), "ORT_DYLIB_PATH is not set: source .kiln/env (scripts/setup ort)"
    with kiln.Optimizer(VIDEO, video={"keyframes": 3, "interpolation": 2}) as opt:
        assert opt.task == "video"
        frames, info = opt.video(tmp_path / "terrain.npy")
        with pytest.raises(ValueError, match="name it .gif"):
            opt.video(tmp_path / "terrain.txt")
        with pytest.raises(ValueError, match="task is `video`"):
            opt.embed(["not a video call"])
    assert frames.dtype == np.float32 and frames.shape[:2] == (5, 3), frames.shape
    assert np.isfinite(frames).all()
    assert info["keyframes"] == [0, 2, 4] and info["fps"] > 0
    assert np.array_equal(np.load(tmp_path / "terrain.npy"), frames)
    # Keyframes differ; a midpoint is its own frame, neither neighbour.
    assert not np.array_equal(frames[0], frames[2])
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[2])
