"""Pretraining methods, registered by name (`train.method`)."""
from __future__ import annotations

from .base import METHODS, Method, StepOutput, build_method, register

# Importing the modules registers the methods.
from . import advcl, simclr, supervised_at  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Method", "StepOutput", "build_method", "register"]
