"""The paper's experiments: models, the training loop (``orthofx train``) and the demo."""
