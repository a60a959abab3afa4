"""Entry point: ``python -m examples.shop ...`` (from the repository root) or
``python examples/shop/__main__.py ...`` (from anywhere)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

if __package__:
    from .cli import main
else:
    # Run as a script: sys.path[0] is this folder, whose module names (app, orders, ...)
    # must not shadow anything. Put the repository root there instead and import the
    # package properly, so that its relative imports work.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    main = importlib.import_module("examples.shop.cli").main

sys.exit(main())
