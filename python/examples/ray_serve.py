"""kiln behind Ray Serve: one kiln model per replica, kiln's own dynamic batching inside.

    pip install ./python "ray[serve]==2.60.0"
    python python/examples/ray_serve.py            # serves http://127.0.0.1:8000/embed
    curl -s -X POST http://127.0.0.1:8000/embed -d '{"input": ["a text", "another"]}'

On a multi-node cluster run the same file with `ray.init(address="auto")` (or `serve run`);
with a GPU config give each replica `ray_actor_options={"num_gpus": 1}`.
"""
import sys

import ray
from ray import serve

import kiln.ray

config = sys.argv[1] if len(sys.argv) > 1 else None  # None: kiln's defaults (MiniLM, CPU)

ray.init()
app = serve.deployment(kiln.ray.Deployment, num_replicas=2, ray_actor_options={"num_cpus": 1}).bind(config)
serve.run(app, route_prefix="/embed", blocking=True)
