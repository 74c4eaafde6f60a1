"""kiln from Python: fast, observable inference over kiln's Rust engine.

    import kiln

    opt = kiln.Optimizer("examples/embed.toml")            # or a dict, or None for the defaults
    vectors = opt.embed(["a text", "another"])              # float32 numpy array [2, 384]
    with opt.monitor("my_step"):                            # a span in kiln's profiler
        ...
    print(opt.stats(), opt.report())
    opt.shutdown()

    frames, info = kiln.Optimizer("examples/video.toml").video("terrain.gif")  # task = "video"

    model = kiln.SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # id or folder
    model.encode(["a text"], batch_size=32, normalize_embeddings=True)

Every call runs in kiln's own threads with the GIL released; Ctrl-C interrupts it.
Errors are :class:`KilnError` (``ValueError`` for a bad input or config) with kiln's
message.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._kiln import PROVIDERS, Engine, KilnError, __version__

__all__ = ["Optimizer", "SentenceTransformer", "KilnError", "PROVIDERS", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


def _sets(prefix: str, value: Any) -> list:
    """`--set` strings for `value` under `prefix`: nested mappings become dotted keys,
    everything else a JSON value (which kiln's `--set` reads as TOML: strings, numbers,
    booleans and lists are written alike)."""
    if isinstance(value, Mapping):
        out = []
        for key, inner in value.items():
            out += _sets(f"{prefix}.{key}" if prefix else str(key), inner)
        return out
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return [f"{prefix}={json.dumps(value)}"]


def _messages(messages: Optional[Sequence[Mapping[str, Any]]]) -> Optional[str]:
    if messages is None:
        return None
    out = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            parts = []
            for p in content:
                p = dict(p)
                if p.get("type") == "image" and isinstance(p.get("path"), os.PathLike):
                    p["path"] = os.fspath(p["path"])
                parts.append(p)
            content = parts
        out.append({"role": m["role"], "content": content})
    return json.dumps(out)


class Optimizer:
    """A model loaded with kiln around it: batching, the cache, timeouts, the profiler
    and the trackers a config selects.

    ``config`` is a config file's path, a dict of the same sections, or ``None`` for
    kiln's defaults (candle on the CPU, MiniLM). Keyword arguments override keys as
    ``kiln --set`` does: ``Optimizer(cfg, model={"path": "org/name"}, batching={"max_batch_size": 64})``
    or ``Optimizer(cfg, **{"model.dtype": "f16"})``. ``model.path`` may be a folder or a
    Hugging Face id: from the local Hugging Face cache, downloaded into it when missing
    (unless ``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, config: Union[PathLike, Mapping[str, Any], None] = None, **overrides: Any):
        path = None
        sets: list = []
        if isinstance(config, Mapping):
            sets += _sets("", config)
        elif config is not None:
            path = os.fspath(config)
        for key, value in overrides.items():
            sets += _sets(key.replace("__", "."), value)
        self._engine = Engine(path, sets)

    @property
    def task(self) -> str:
        """The config's task: ``embed``, ``classify``, ``generate`` or ``video``."""
        return self._engine.task

    # -- embeddings --------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One float32 vector per text, as an ``[n, dim]`` array, in order."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of texts; for one text pass [text]")
        return self._engine.embed(list(texts))

    def encode(self, sentences: Union[str, Sequence[str]], batch_size: int = 32, show_progress_bar: Optional[bool] = None,
               convert_to_numpy: bool = True, normalize_embeddings: bool = False, **unused: Any):
        """sentence-transformers' ``encode``: a 1-D array for one sentence, ``[n, dim]``
        for a list (a list of 1-D arrays with ``convert_to_numpy=False``), L2-normalised
        with ``normalize_embeddings``. ``batch_size`` and ``show_progress_bar`` are
        accepted for compatibility: kiln batches by its config (``batching``)."""
        if unused.get("convert_to_tensor"):
            raise ValueError("convert_to_tensor is not supported: kiln returns numpy arrays")
        one = isinstance(sentences, str)
        vectors = self.embed([sentences] if one else list(sentences))
        if normalize_embeddings and len(vectors):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if one:
            return vectors[0]
        return vectors if convert_to_numpy else list(vectors)

    async def aembed(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`embed` for asyncio: runs in a worker thread (kiln releases the GIL)."""
        return await asyncio.to_thread(self.embed, texts)

    # -- classification ----------------------------------------------------------

    def classify(self, images: Sequence[Union[PathLike, bytes, np.ndarray]]) -> list:
        """Per image (a path, encoded bytes, or an ``[h, w, 3]`` uint8 array), its top
        classes ``{"top_k": [{"label", "index", "score"}, ...]}`` or ``{"error": why}``."""
        inputs = []
        for image in images:
            if isinstance(image, np.ndarray):
                inputs.append(_png(image))
            elif isinstance(image, (bytes, bytearray)):
                inputs.append(bytes(image))
            else:
                inputs.append(os.fspath(image))
        return [json.loads(r) for r in self._engine.classify(inputs)]

    async def aclassify(self, images: Sequence[Union[PathLike, bytes, np.ndarray]]) -> list:
        """:meth:`classify` for asyncio."""
        return await asyncio.to_thread(self.classify, images)

    # -- generation --------------------------------------------------------------

    def generate(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[Mapping[str, Any]]] = None,
                 files: Optional[Sequence[PathLike]] = None) -> dict:
        """One generation to its end: ``{"text", "tokens", "prompt_tokens",
        "image_tokens", "finish_reason", "time_to_first_token_ms", "elapsed_ms"}``.
        ``files`` are images asked about with ``prompt`` (a vision-language model):
        ``generate(prompt="Compare these images.", files=[a, b])``."""
        prompt, messages = _prompt(prompt, messages, files)
        return json.loads(self._engine.generate(prompt, messages))

    async def agenerate(self, prompt: Optional[str] = None, **kwargs: Any) -> dict:
        """:meth:`generate` for asyncio."""
        return await asyncio.to_thread(self.generate, prompt, **kwargs)

    def stream(self, prompt: Optional[str] = None, *, messages: Optional[Sequence[Mapping[str, Any]]] = None,
               files: Optional[Sequence[PathLike]] = None) -> "Stream":
        """The generation's text pieces as they come (iterate it); ``stream.result`` is
        the finished generation once it ends. Closing it (or leaving a ``with`` block)
        stops the generation."""
        prompt, messages = _prompt(prompt, messages, files)
        return Stream(self._engine.stream(prompt, messages))

    # -- video -------------------------------------------------------------------

    def video(self, path: Optional[PathLike] = None) -> Tuple[np.ndarray, dict]:
        """Renders the configured video (``task = "video"``): its frames as float32
        ``[frames, 3, height, width]`` (RGB) and a dict of the render (``fps``, ``keyframes``,
        ``seconds``, ...). With ``path`` (.gif, .mp4, .png, .npy) it is also written there,
        as ``kiln run`` writes it."""
        frames, info = self._engine.video(None if path is None else str(path))
        return frames, json.loads(info)

    # -- observability -----------------------------------------------------------

    @contextlib.contextmanager
    def monitor(self, name: str) -> Iterator[None]:
        """A span ``name`` in kiln's profiler around the block (in :meth:`report`, the
        Chrome trace and the trackers), as seed 004's ``PerformanceMonitor``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._engine.record_span(name, time.perf_counter() - started)

    def stats(self) -> dict:
        """What kiln has done so far: requests, latencies, batches, cache, memory."""
        return json.loads(self._engine.stats())

    def report(self) -> Optional[dict]:
        """The profiler's report (spans' durations, peak memory, CPU, GPU, the MLX
        allocator), or ``None`` with ``profiler.enabled`` off."""
        return json.loads(self._engine.report())

    def shutdown(self) -> Optional[dict]:
        """Stops the model and the trackers (their last step and summary are written);
        returns the final stats. The optimizer cannot be used after."""
        return json.loads(self._engine.shutdown())

    def __enter__(self) -> "Optimizer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class Stream:
    """A generation's text pieces; ``result`` once it has ended."""

    def __init__(self, native: Any):
        self._native = native

    def __iter__(self) -> Iterator[str]:
        for _token, text in self._native:
            yield text

    @property
    def result(self) -> Optional[dict]:
        done = self._native.done
        return json.loads(done) if done else None

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _prompt(prompt, messages, files):
    if files is not None:
        if messages is not None:
            raise ValueError("give files with a prompt, or image parts inside messages, not both")
        parts = [{"type": "image", "path": os.path.abspath(os.fspath(f))} for f in files]
        parts.append({"type": "text", "text": prompt or ""})
        return None, json.dumps([{"role": "user", "content": parts}])
    return prompt, _messages(messages)


def _png(array: np.ndarray) -> bytes:
    """An ``[h, w, 3]`` uint8 array as PNG bytes (no compression), for kiln's decoder."""
    import struct
    import zlib

    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"an image array must be uint8 [height, width, 3], not {array.dtype} {list(array.shape)}")
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b"")


class SentenceTransformer(Optimizer):
    """A drop-in for ``sentence_transformers.SentenceTransformer`` on kiln:
    ``SentenceTransformer(model_name_or_path).encode(sentences, ...)``. The model is a
    folder or a Hugging Face id (cached, or downloaded into the cache unless
    ``HF_HUB_OFFLINE=1``); ``device`` is kiln's
    (``"cpu"``, ``"cuda:0"``)."""

    def __init__(self, model_name_or_path: PathLike, device: Optional[str] = None, **overrides: Any):
        model = {"path": os.fspath(model_name_or_path)}
        if device is not None:
            model["device"] = device
        super().__init__(None, model=model, **overrides)
