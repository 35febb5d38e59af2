"""The Ray Data adapter of evaluation: one model replica per actor (a GPU per actor when there are GPUs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phi1_ray.evals.generation import EvalSampling, Sample, complete_with_model


class _Completer:
    def __init__(self, checkpoint: str, sampling: EvalSampling, use_gpu: bool) -> None:
        import torch

        from phi1_ray.checkpoint import load_model

        self.model, self.tokenizer = load_model(checkpoint)
        if self.tokenizer is None:
            raise ValueError(f"{checkpoint}: no tokenizer saved with the checkpoint")
        if use_gpu:
            self.model = self.model.to("cuda", dtype=torch.float16)
        self.sampling = sampling

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rows = list(zip(batch["task_id"], batch["prompt"], (int(i) for i in batch["sample_index"])))
        samples = complete_with_model(self.model, self.tokenizer, rows, self.sampling)
        return {
            "task_id": [s.task_id for s in samples],
            "sample_index": [s.sample_index for s in samples],
            "completion": [s.completion for s in samples],
            "raw": [s.raw for s in samples],
        }


def complete_on_ray(
    checkpoint: str,
    rows: Sequence[tuple[str, str, int]],
    sampling: EvalSampling,
    actors: int = 1,
    use_gpu: bool = False,
) -> list[Sample]:
    """Complete ``rows`` with ``actors`` model replicas in a Ray Data actor pool; results in the order of ``rows``."""
    import ray.data

    items = [{"task_id": t, "prompt": p, "sample_index": i, "order": k} for k, (t, p, i) in enumerate(rows)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), actors * 4)))
    out = ds.map_batches(
        _Completer,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "sampling": sampling, "use_gpu": use_gpu},
        batch_size=sampling.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    ).take_all()
    done = {(r["task_id"], int(r["sample_index"])): r for r in out}
    return [Sample(t, done[(t, i)]["completion"], done[(t, i)]["raw"], i) for t, _, i in rows]
