"""One Ray task per model: a survey over a cluster, with the driver as the store's only writer.

Each task loads and measures one model (:func:`equifast.survey.runner.measure_model`, so out of
memory halves the batch there too) and sends back its :class:`ModelOutcome`; the driver writes
each outcome to SQLite as it arrives, in one transaction per model. A task asks for one GPU when
the cluster has GPUs and one CPU otherwise, so Ray runs as many models at once as there are
devices. Ray is the scheduler: nothing here queues or retries beyond what Ray does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from equifast.survey.runner import ModelOutcome, measure_model

__all__ = ["run_with_ray"]


def _measure_task(model: str, data: Any, group: str, batch_size: int, min_batch_size: int,
                  measure_kwargs: dict[str, Any], seed: int,
                  model_kwargs: dict[str, Any] | None, imports: Sequence[str]) -> ModelOutcome:
    # No progress bars from workers: their output interleaves in the driver's terminal.
    measure_kwargs = {**measure_kwargs, "progress": False}
    return measure_model(model, data, group, batch_size, min_batch_size, measure_kwargs, seed,
                         model_kwargs, imports)


def run_with_ray(models: Sequence[str], data: Any, group: str, batch_size: int,
                 min_batch_size: int, measure_kwargs: dict[str, Any], seed: int,
                 model_kwargs: dict[str, Any] | None = None, imports: Sequence[str] = (), *,
                 address: str | None, on_outcome: Callable[[ModelOutcome], None]) -> None:
    """Run ``models`` as Ray tasks and call ``on_outcome`` in the driver as each one finishes.

    Args:
        address: A Ray cluster (``"auto"``, ``"ray://head:10001"``) or None for a local Ray
            started here (and stopped after).
    """
    try:
        import ray
    except ImportError:
        raise ImportError("ray=...: Ray is not installed (pip install 'ray[default]')") from None

    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        if gpus < 1 and str(measure_kwargs.get("device", "cpu")).startswith("cuda"):
            raise ValueError("device='cuda' but the Ray cluster has no GPU")
        task = ray.remote(**resources)(_measure_task)
        # Large arguments (a tensor of images) go to the object store once, not once per task.
        data_ref = ray.put(data)
        pending = {
            task.remote(model, data_ref, group, batch_size, min_batch_size, measure_kwargs, seed,
                        model_kwargs, list(imports)): model for model in models
        }
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                model = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - the worker died (killed, lost node)
                    import traceback

                    outcome = ModelOutcome(model=model, attempts=1, errors=[
                        (1, batch_size, "worker_lost", f"{type(error).__name__}: {error}",
                         traceback.format_exc())])
                on_outcome(outcome)
    finally:
        if started_here:
            ray.shutdown()
