"""Converters from other implementations' checkpoints."""

from .official import ConversionError, convert_official, resolve_official_config

__all__ = ["ConversionError", "convert_official", "resolve_official_config"]
