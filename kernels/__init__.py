"""Triton kernels of fastopt: the four fused-step ops, with fastopt.reference's signatures.

Each op is one multi-tensor launch (the device table in _table.py) with no host sync. On CPU
tensors they run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton's import).

This folder is installed as ``fastopt.kernels`` (pyproject.toml maps it). From a checkout's
root, where Python puts the current folder first on ``sys.path``, it is also found as a
top-level ``kernels``, a name that belongs to another project on PyPI (Hugging Face's kernel
hub, which transformers and bitsandbytes import). Imported under that name, this module hands
the name to the installed package, or fails as if the folder were not there: a checkout never
shadows an installed package.
"""

if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the kernels/ folder of a fastopt checkout is "
            "fastopt.kernels, not a top-level package)",
            name=__name__,
        )
    _module = _util.module_from_spec(_spec)
    # The import system returns what sys.modules holds once this module has run.
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from .accumulate import accumulate_
    from .adamw import adamw_step
    from .loss_scale import update_scale_
    from .norm import multi_tensor_norm

    __all__ = ["accumulate_", "adamw_step", "multi_tensor_norm", "update_scale_"]
