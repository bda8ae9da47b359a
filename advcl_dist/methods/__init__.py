"""Pretraining methods, registered by name (`train.method`); see base.py for the plug-in API."""
from __future__ import annotations

from .base import METHODS, NEEDS, Method, StepContext, StepOutput, build_method, register, split_views

# Importing the modules registers the methods.
from . import advcl, simclr, supervised_at  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "NEEDS", "Method", "StepContext", "StepOutput", "build_method", "register", "split_views"]
