"""Conversions of existing models (timm, transformers) to sparseforge attention."""
