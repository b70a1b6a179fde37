"""Tests of the model integrations (timm, transformers)."""
