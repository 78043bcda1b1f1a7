"""The config loader is total: whatever a deploy.yaml holds, the result is a DeployConfig or a ConfigError.

Three generators: arbitrary bytes, arbitrary YAML-ish documents, and the repository's deploy.yaml with
random parts replaced, removed or added (the inputs most likely to get deep into validation).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import DeployConfig, dump_deploy, load_deploy, parse_deploy
from pipeline.errors import ConfigError

from conftest import REPO

BASE = yaml.safe_load((REPO / "deploy.yaml").read_text())
#: CONFIG_EXAMPLES=5000 for a longer, random search; by default 200 examples, the same ones on every run
EXAMPLES = os.environ.get("CONFIG_EXAMPLES")
SETTINGS = settings(max_examples=int(EXAMPLES or 200), deadline=None, derandomize=EXAMPLES is None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "none", "int8-static", "magnitude", "rpi4", "small-cnn", "npz", "a/b", "#", "+", "1e999",
                     "2024-13-01", "~", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(["version", "model", "zoo", "factory", "checkpoint", "data",
                                                        "compress", "method", "targets", "budgets", "fleet",
                                                        "devices", "export", "recipes", "fit", "id", "target"]),
                 st.integers(-3, 3), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


def load(path: Path) -> DeployConfig | None:
    """The property: a config, or the project's config error with a message; nothing else escapes."""
    try:
        cfg = load_deploy(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        assert len(str(exc)) < 20_000  # untrusted input is echoed bounded
        return None
    assert isinstance(cfg, DeployConfig)
    assert parse_deploy(dump_deploy(cfg), cfg.source, cfg.base_dir) == cfg  # what loads round-trips
    return cfg


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prop") / "deploy.yaml"


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes(path, raw):
    path.write_bytes(raw)
    load(path)


@SETTINGS
@given(values)
def test_any_yaml_document(path, doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load(path)


def paths_of(doc, prefix=()):
    """Every (path) into the nested config, containers included."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths_of(v, (*prefix, i))


ALL_PATHS = list(paths_of(BASE))[1:]
mutation = st.tuples(st.sampled_from(["replace", "delete", "add"]), st.sampled_from(ALL_PATHS), keys, values)


def mutate(doc, op, where, key, value):
    parent = doc
    for p in where[:-1]:
        parent = parent[p]
    last = where[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = value


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_configs(path, mutations):
    doc = copy.deepcopy(BASE)
    for op, where, key, value in mutations:
        try:
            mutate(doc, op, where, key, value)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the path
            continue
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8", errors="surrogatepass")
    load(path)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("[]{}:,-&*!|>'\"#%@` \n\tab1")), max_size=200))
def test_yaml_syntax_soup(path, text):
    path.write_text("version: 1\nmodel: {zoo: small-cnn}\n" + text)
    load(path)


def test_the_generators_reach_valid_configs(path):
    """The mutated-config generator is no error generator only: unchanged and lightly changed ones load."""
    path.write_text(yaml.safe_dump(BASE))
    assert load(path) is not None
    doc = copy.deepcopy(BASE)
    mutate(doc, "replace", ("compress", 0, "sparsity"), None, 0.5)
    path.write_text(yaml.safe_dump(doc))
    assert load(path).compress[0].params()["sparsity"] == 0.5
