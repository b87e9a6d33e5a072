"""skAIn: multimodal skin-lesion classification on HAM10000 (image + age, sex, body site)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "Result", "__version__", "load"]

if TYPE_CHECKING:  # for type checkers; at run time the names load on first use (below)
    from skain.api import Model, Result, load

_API = ("Model", "Result", "load")


def __getattr__(name: str) -> Any:
    """`skain.load`, `skain.Model` and `skain.Result` import the API (and torch) on first use only (PEP 562), so
    `import skain` stays light: the console script imports this package before it chooses the memory allocator."""
    if name in _API:
        from skain import api
        return getattr(api, name)
    raise AttributeError(f"module 'skain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
