"""Integrations with training frameworks and model zoos (each needs its extra).

* :mod:`orthofx.integrations.lightning` — ``OrthofxCallback`` for Lightning
  (``pip install 'orthofx[lightning]'``).
* :mod:`orthofx.integrations.huggingface` — ``OrthofxTrainerCallback`` for the Hugging Face
  ``Trainer`` (``pip install 'orthofx[hf]'``).
* :mod:`orthofx.integrations.timm` — importing it registers ``orthofx_resnet18_gcp`` and
  ``orthofx_resnet50_dbn`` with ``timm.create_model`` (``pip install 'orthofx[timm]'``).

Nothing here is imported by ``import orthofx``; see docs/integrations.md for the ordering
rules every training loop must follow.
"""
