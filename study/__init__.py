"""dpstudy: Ray-distributed hyperparameter studies for DP image classification."""
