"""Draft training: data regeneration, online target features, losses, and the trainer.

What lives here: `data` (prompts -> target-regenerated conversations -> examples),
`features` (the frozen target's hidden states, computed inside the step), `losses`
(DSpark / DFlash objectives), `eagle3_loss` (EAGLE-3 with the training-time test),
`trainer` (`dspark train`: AdamW, warm-up + cosine, accumulation, multi-process,
atomic checkpoints, exact resume, metrics.jsonl).

Who may import it: the CLI and tools. It imports the models, the backends and the engine
(for regeneration); nothing below imports it.
"""
from .batch import TrainBatch
from .trainer import TrainConfig, Trainer, train, training_loss

__all__ = ["TrainBatch", "TrainConfig", "Trainer", "train", "training_loss"]
