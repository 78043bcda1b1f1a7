"""Device classes, one YAML each: package data, installed as ``pipeline._targets`` (see setup.py)."""
