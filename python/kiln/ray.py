"""kiln on Ray, for batch jobs past one machine: one kiln model per Ray actor.

    import ray
    import kiln.ray

    ds = ray.data.from_items([{"text": t} for t in texts])
    ds = ds.map_batches(
        kiln.ray.Embedder,
        fn_constructor_kwargs={"config": "examples/embed.toml"},
        concurrency=2,           # actors, each with its own model
        batch_size=512,          # rows a call hands kiln; kiln batches them its own way
        num_cpus=1,              # per actor; num_gpus=1 with a GPU config
    )
    vectors = np.stack(ds.take_all()...)   # or ds.write_parquet(...)

``Embedder`` is a callable class, as Ray Data's ``map_batches`` takes for stateful work:
Ray builds it once per actor (the model loads once) and calls it with batches of rows
as ``{"text": numpy array of str, ...}``. It returns the batch with an ``"embedding"``
column: a float32 ``[rows, dim]`` array, the rows in the batch's order — the same
vectors one ``Optimizer.embed`` call gives for the same texts. Inside a call kiln's own
batching, cache and threads do the work (``Optimizer.embed``).

``kiln.ray.Deployment`` is a class for Ray Serve (``serve.deployment(Deployment)``): see
``python/examples/ray_serve.py``.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import numpy as np

from . import Optimizer, PathLike

__all__ = ["Embedder", "Deployment"]


class Embedder:
    """A callable class for ``ray.data.Dataset.map_batches``: ``{column: texts}`` in, the
    same batch with ``output`` (float32 ``[rows, dim]``) out.

    ``config`` and ``overrides`` are ``kiln.Optimizer``'s; ``column`` names the texts,
    ``output`` the embeddings' column.
    """

    def __init__(self, config: Union[PathLike, Mapping[str, Any], None] = None, *, column: str = "text",
                 output: str = "embedding", **overrides: Any):
        self.optimizer = Optimizer(config, **overrides)
        if self.optimizer.task != "embed":
            raise ValueError(f"kiln.ray.Embedder needs an embed-task config, not {self.optimizer.task!r}")
        self.column = column
        self.output = output

    def __call__(self, batch: Mapping[str, Any]) -> dict:
        if self.column not in batch:
            raise KeyError(f"the batch has no {self.column!r} column (it has {sorted(batch)}); "
                           f"pass column= to kiln.ray.Embedder")
        texts = [str(t) for t in batch[self.column]]
        out = dict(batch)
        out[self.output] = self.optimizer.embed(texts)
        return out

    def __del__(self) -> None:
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            try:
                optimizer.shutdown()
            except Exception:  # noqa: BLE001 - a dying actor has nobody to tell
                pass


class Deployment:
    """A Ray Serve deployment class over kiln: ``await handle.embed.remote(texts)`` (or an
    HTTP POST of ``{"input": [...]}``) gives the embeddings as lists. Concurrent calls
    reach kiln's own dynamic batching in the replica (no ``@serve.batch`` needed); scale
    with ``num_replicas``."""

    def __init__(self, config: Union[PathLike, Mapping[str, Any], None] = None, **overrides: Any):
        self.optimizer = Optimizer(config, **overrides)

    async def embed(self, texts: list) -> list:
        vectors: np.ndarray = await self.optimizer.aembed([str(t) for t in texts])
        return vectors.tolist()

    async def __call__(self, request: Any) -> dict:
        body = await request.json()
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list):
            return {"error": "send {\"input\": a text or a list of texts}"}
        return {"data": await self.embed(texts)}
