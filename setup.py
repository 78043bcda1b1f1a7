"""Packages, and the one mapping pyproject.toml cannot express next to package discovery.

targets/ (one YAML per device class) stays at the repository's root and ships inside the wheel as the
package ``pipeline._targets``, which ``pipeline.targets`` reads through importlib.resources; an editable
install maps the same package name onto targets/ itself. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pipeline*", "device_agent*"]), "pipeline._targets"],
    package_dir={"pipeline._targets": "targets"},
)
