"""kiln.ray on a real local Ray cluster (ray from PyPI, `scripts/setup python`): 10,000
texts through Ray Data's `map_batches` with two kiln actors give the embeddings one
direct `embed` call gives, in the same order."""
import pathlib
import time

import numpy as np
import pytest

import kiln
import kiln.ray

ROOT = pathlib.Path(__file__).resolve().parents[2]
EMBED = ROOT / "examples/embed.toml"

WORDS = ("the model reads every document in the archive and returns a short summary for the search team "
         "before the meeting on monday we checked the latency of each request").split()


def texts(n: int) -> list:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 17)) + f" #{i}" for i in range(n)]


@pytest.fixture(scope="module")
def cluster():
    try:
        import ray
    except ImportError as e:  # a test that cannot run fails with the reason
        pytest.fail(f"ray is not installed ({e}): run scripts/setup python")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_map_batches_with_two_actors_gives_the_direct_embeddings_in_order(cluster):
    ray = cluster
    data = texts(10_000)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(data)])
    start = time.perf_counter()
    rows = ds.map_batches(
        kiln.ray.Embedder,
        fn_constructor_kwargs={"config": str(EMBED)},
        concurrency=2,
        batch_size=500,
        num_cpus=1,
    ).take_all()
    took = time.perf_counter() - start
    assert [r["i"] for r in rows] == list(range(len(data))), "Ray Data kept the rows' order"
    got = np.stack([r["embedding"] for r in rows])
    assert got.dtype == np.float32 and got.shape == (len(data), 384)

    with kiln.Optimizer(EMBED) as opt:
        direct = opt.embed(data)
    cosines = (got * direct).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(direct, axis=1))
    print(f"10,000 texts through 2 kiln actors in {took:.1f} s; worst cosine to one direct embed {cosines.min():.6f}")
    assert cosines.min() >= 0.9999, cosines.min()


def test_a_batch_without_the_column_is_refused_by_name():
    embedder = kiln.ray.Embedder(str(EMBED))
    with pytest.raises(KeyError, match="no 'text' column"):
        embedder({"sentence": np.array(["a"])})
    out = embedder({"text": np.array(["a text", "another"]), "id": np.array([7, 8])})
    assert out["embedding"].shape == (2, 384) and list(out["id"]) == [7, 8]
