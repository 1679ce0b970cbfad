"""Integrations of rlmon with training frameworks.

Each module imports its framework at import time, so import only the one you use:

* :mod:`rlmon.integrations.transformers` — ``RlmonCallback``, a ``transformers.TrainerCallback``
  for Hugging Face's ``Trainer`` and TRL's trainers (also reachable as ``rlmon.RlmonCallback``,
  loaded on first use).
"""
