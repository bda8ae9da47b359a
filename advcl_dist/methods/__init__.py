"""Pretraining methods, registered by name (`train.method`); see base.py for the plug-in API."""
from __future__ import annotations

from .base import (
    METHODS,
    NEED_FIELDS,
    NEEDS,
    VARIANTS,
    Method,
    PostProcess,
    StepContext,
    StepOutput,
    build_method,
    method_values,
    register,
    register_variant,
    split_views,
)

# Importing the modules registers the methods and their variants.
from . import advcl, simclr, supervised_at  # noqa: E402,F401  isort: skip
from . import acl, apdpe, deacl, dynacl, lpaff, rocl  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "NEEDS", "NEED_FIELDS", "VARIANTS", "Method", "PostProcess", "StepContext", "StepOutput",
           "build_method", "method_values", "register", "register_variant", "split_views"]
