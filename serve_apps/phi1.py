"""phi1_ray's OpenAI-compatible completions API as a Ray Serve application.

    serve run serve_apps.phi1:app                      # $PHI1_CHECKPOINT, else the checkpoint `make demo` exports
    serve run serve_apps.phi1:app_builder checkpoint=runs/demo/export num_replicas=2
    serve run serve_apps/phi1.yaml                     # autoscaling, limits and GPUs from the config file
    serve deploy serve_apps/phi1.yaml                  # the same, to a running cluster

(Ray's CLI takes the dotted module path, ``serve_apps.phi1:app``, not ``serve_apps/phi1:app``.) The arguments are
:class:`phi1_ray.serving.app.AppArgs`; the engine is :class:`phi1_ray.serving.engine.InferenceEngine`.
"""

from __future__ import annotations

from typing import Any

from phi1_ray.serving.app import AppArgs, app_builder

__all__ = ["AppArgs", "app_builder"]  # and `app`, built on access (below)


def __getattr__(name: str) -> Any:
    # `app` is built when Ray's CLI asks for it, so a missing checkpoint fails then, with what to do.
    if name == "app":
        return app_builder({})
    raise AttributeError(name)
