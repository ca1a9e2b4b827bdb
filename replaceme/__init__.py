"""replaceme — training-free depth pruning of LLMs (ReplaceMe, arXiv 2505.02819).

    from replaceme import prune

    result = prune("examples/quickstart.yaml", output_dir="outputs/api")
    print(result.blocks, result.report["retention"], result.mlflow_run_id)

The names below are imported on first use, so that ``import replaceme`` (and the command line's
``--help``) stays fast: the run itself imports torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PruneResult", "ReplaceMeConfig", "ReplaceMeError", "TrackingError", "__version__", "load_config", "prune"]

if TYPE_CHECKING:
    from replaceme.api import PruneResult, prune
    from replaceme.config import ReplaceMeConfig, load_config
    from replaceme.errors import ReplaceMeError
    from replaceme.tracking import TrackingError

_HOMES = {"prune": "api", "PruneResult": "api", "ReplaceMeConfig": "config", "load_config": "config",
          "ReplaceMeError": "errors", "TrackingError": "tracking"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f"replaceme.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'replaceme' has no attribute {name!r}")
