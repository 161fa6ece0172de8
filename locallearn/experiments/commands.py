"""Subcommands of ``locallearn`` beyond ``rhm info``; each registrar adds one to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = []
