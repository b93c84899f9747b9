"""Is the running script about to start worker processes from unguarded top-level code?

Worker processes started with ``spawn`` or ``forkserver`` begin by importing the
parent's main script (as ``__mp_main__``). A script that starts a loader's
workers from top-level code without an ``if __name__ == "__main__":`` guard
makes every worker run that code again, and the workers die
(``BrokenProcessPool``). This module finds that case in the parent, before any
worker starts, from the main module's source: the line of the script's
top-level code that is running now must lie inside such a guard.
"""

from __future__ import annotations

import ast
import functools
import sys


def _is_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either side, possibly inside an and/or)."""
    for node in ast.walk(test):
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            sides = [node.left, *node.comparators]
            names = any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
            main = any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
            if names and main and isinstance(node.ops[0], ast.Eq):
                return True
    return False


@functools.cache
def _guarded_lines(path: str) -> tuple[tuple[int, int], ...] | None:
    """Line ranges of PATH's ``if __name__ == "__main__":`` bodies (None: unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    return tuple(
        (node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_guard(node.test) and node.body
    )


def unguarded_top_level_line() -> tuple[str, int] | None:
    """(script, line) when the main script's top-level code running now is outside
    an ``if __name__ == "__main__":`` guard and workers would re-import the script;
    None when that cannot happen or cannot be told (no script file, ``python -m
    pkg`` run as ``pkg/__main__.py``, a call from another thread)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if main is None or not path:
        return None  # an interactive session or `python -c`: workers import nothing
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return None  # multiprocessing does not re-import a package's __main__
    frame = sys._getframe(1)
    while frame is not None and not (
        frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"
    ):
        frame = frame.f_back
    if frame is None:
        return None
    guarded = _guarded_lines(path)
    if guarded is None:
        return None
    line = frame.f_lineno
    if any(lo <= line <= hi for lo, hi in guarded):
        return None
    return path, line
