"""What ``python -m fastopt train`` trains: a model factory and a dataset factory.

A job names both by import path. ``gpt`` (the default) is a character-level GPT on the
standard library's ``.py`` sources; ``mlp`` an MLP on generated data, the fastest smoke test.
``model_factory`` and ``dataset_factory`` (``"package.module:function"``) replace either with
your own, so a model of yours trains under ``python -m fastopt train`` with every feature of
the trainer:

* the dataset factory is called with the ``data`` section's keys (less the loader's:
  ``batch_size``, ``val_batch_size``, ``num_workers``), and ``seed=`` the config's seed when
  it has a ``seed`` parameter. It returns a :class:`JobData` or a tuple
  ``(train, val[, test])`` of datasets yielding ``(inputs, targets)``.
* the model factory is called with the ``model`` section's keys and the data's
  ``model_args`` (the vocabulary size, say); it returns an ``nn.Module`` whose output the
  loss, cross-entropy over the last dimension, takes with the targets.

A factory's parameters are the section's keys: an unknown key is refused when the config is
read, and the defaults are written out, so ``--print-config`` and ``run.json`` show them all.

Modules: :mod:`~.job_data` (:class:`JobData`), :mod:`~.presets` (the built-in jobs and their
config per device), :mod:`~.factories` (factories imported, checked and called; configs read
with them), :mod:`~.runner` (:func:`run_job`). The built-in jobs' models and data are
``fastopt.train.gpt``, ``fastopt.train.text_data`` and ``fastopt.train.mlp``, named by import
path like one's own.
"""

from .factories import (
    build_job,
    check_sections,
    checked,
    config_from_dict,
    import_factory,
    load_config,
)
from .job_data import JobData
from .presets import JOBS, LOADER_DEFAULTS, Job, job_preset
from .runner import cross_entropy, run_job

__all__ = [
    "JOBS",
    "LOADER_DEFAULTS",
    "Job",
    "JobData",
    "build_job",
    "check_sections",
    "checked",
    "config_from_dict",
    "cross_entropy",
    "import_factory",
    "job_preset",
    "load_config",
    "run_job",
]
