"""What runs inside one trial: data, models, pruning, dropping, the DP optimizer,
accounting, checkpoints and the train loop (pipeline order). No Ray except in
``tune_trainable``; no Optuna."""
