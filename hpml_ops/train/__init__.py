"""MLP training on the fused ops: the lecture's recipe (mini-batch SGD with momentum or Adam,
learning-rate schedules with warm-up and the linear batch-size scaling rule, gradient
accumulation, input normalisation fitted on the training split, autocast, checkpoints that resume
to the identical loss curve, DistributedDataParallel), the CLI ``python -m hpml_ops.train`` and the
comparison with the same model in plain PyTorch.

Importing this package needs only torch; scikit-learn (the bundled datasets), tqdm (the progress
bar) and matplotlib (the plot) are imported when used (``pip install 'hpml_ops[train]'``).

    from hpml_ops.train import TrainConfig, train
    result = train(TrainConfig(dataset="breast_cancer", epochs=30))
    result.history["epoch"][-1]["test_acc"]
"""

from .data import DATASETS, Dataset, load_dataset
from .loop import ConfigError, TrainConfig, TrainResult, evaluate, train
from .normalize import NORMALIZATIONS, Normalizer
from .schedules import SCHEDULES, ScheduleConfig, build_scheduler, lecture_lr, scaled_lr

__all__ = [
    "DATASETS",
    "NORMALIZATIONS",
    "SCHEDULES",
    "ConfigError",
    "Dataset",
    "Normalizer",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "build_scheduler",
    "evaluate",
    "lecture_lr",
    "load_dataset",
    "scaled_lr",
    "train",
]
