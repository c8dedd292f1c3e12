"""Grad mode: whether ops record the graph that ``backward()`` walks.

``no_grad`` turns recording off (inference, optimizer updates, in-place edits of leaves);
``enable_grad`` turns it back on inside a ``no_grad`` block. Both are context managers and
decorators, as in torch.
"""

from __future__ import annotations


class _GradMode:
    enabled = True


def is_grad_enabled() -> bool:
    return _GradMode.enabled


class no_grad:
    """Context manager (and decorator) that disables graph recording, like ``torch.no_grad``."""

    def __enter__(self) -> None:
        self._prev = _GradMode.enabled
        _GradMode.enabled = False

    def __exit__(self, *exc: object) -> None:
        _GradMode.enabled = self._prev

    def __call__(self, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            with type(self)():  # no_grad or enable_grad, whichever decorated fn
                return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = getattr(fn, "__doc__", None)
        return wrapper


class enable_grad(no_grad):
    def __enter__(self) -> None:
        self._prev = _GradMode.enabled
        _GradMode.enabled = True
