"""Integrations with other libraries' training stacks (each submodule imports its library lazily).

* :mod:`nmsparse.integrations.hf`: Hugging Face ``transformers`` (``save_pretrained`` /
  ``from_pretrained`` of sparsified models, ``Trainer`` checkpoints and resume).
"""
