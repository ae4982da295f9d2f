"""Stage 5: measure the model on a held-out split: accuracy and macro-F1 for classifiers,
loss and perplexity for any task. The baseline (before training) and the final run use this
same function on the same batches of the test split, so their numbers compare; the
evaluations during training, which early stopping selects on, use the validation split.

Each rank evaluates its share of the batches; the sums (a confusion matrix, the summed
loss) are added across ranks before the metrics are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from finetune_trainer.batches import Batch, Encoded, loader_threads, polled_eval_batches
from finetune_trainer.config import Metric, Task
from finetune_trainer.distributed import World
from finetune_trainer.models import autocast, cache_off, logits_of
from finetune_trainer.train import loss_sum, unwrap


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, collate: Callable[[Encoded, list[int]], Batch], task: Task,
             metrics: list[Metric], batch_size: int, world: World, num_labels: int,
             dtype: torch.dtype | None = None, before_batch: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The metrics on `data`; `before_batch` runs before each batch (as many times on every rank), and may raise
    to abandon the evaluation (the training loop's on SIGTERM)."""
    model = unwrap(model)  # no gradient sync needed, and DDP's forward would expect a backward
    was_training = model.training
    model.eval()
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=world.device)
    loss = torch.zeros((), dtype=torch.float64, device=world.device)
    targets = 0
    with cache_off(model):
        for _, batch in polled_eval_batches(data, collate, batch_size, world.rank, world.size, before_batch,
                                            loader_threads(task, world.device)):
            batch = batch.to(world.device)
            with autocast(world.device.type, dtype):
                logits = logits_of(model, batch.inputs)
            loss += loss_sum(logits, batch.labels, task)
            targets += batch.targets
            if task != Task.CAUSAL_LM:
                pairs = batch.labels * num_labels + logits.argmax(-1)
                confusion += torch.bincount(pairs, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    model.train(was_training)
    loss = world.sum_tensor(loss)
    confusion = world.sum_tensor(confusion)
    (targets,) = world.sum([targets])
    mean_loss = float(loss) / max(targets, 1)
    values = {Metric.LOSS: mean_loss, Metric.PERPLEXITY: math.exp(min(mean_loss, 700))}
    if task != Task.CAUSAL_LM:
        values[Metric.ACCURACY] = float(confusion.trace() / confusion.sum())
        values[Metric.F1] = macro_f1(confusion)
    return {m.value: values[m] for m in metrics}


def macro_f1(confusion: torch.Tensor) -> float:
    """F1 averaged over the classes that occur as a label or a prediction (as scikit-learn's macro average)."""
    true_pos = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = 2 * true_pos / (predicted + actual).clamp(min=1)
    return float(f1[present].mean())


def deltas(baseline: dict[str, float], final: dict[str, float]) -> dict[str, float]:
    return {k: final[k] - baseline[k] for k in final if k in baseline}
