"""The contract every registered merge method keeps (as tests/test_policies.py does for every policy).

Parametrized over the registry, plus the worked example of docs/extending/merge-method.md (whose code block runs
here), so a new method module is covered without a line of test code: its parameters are declared with bounds and
validated, it merges deterministically per seed, keeps shapes and dtypes, refuses bad input, and the arm descriptor
describes it finitely. Equality with mergekit is tests/test_mergekit_reference.py's.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch

from simmerge_bandit import descriptor
from simmerge_bandit.errors import InvalidInput
from simmerge_bandit.methods import (REGISTRY, MethodSpec, ParamSpec, get_method, merge_tensors, method_names,
                                     pair_roles, register, unregister)
from simmerge_bandit.methods import method_modules

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending" / "merge-method.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def example():
    """The doc's example method, run from its code block and registered for this module's tests."""
    ns: dict = {}
    exec(compile(doc_blocks()[0], str(DOC), "exec"), ns)
    spec = register(ns["SPEC"])
    yield spec
    unregister(spec.name)


METHODS = [*method_names(), "demo_lerp"]


@pytest.fixture(params=METHODS)
def spec(request, example) -> MethodSpec:
    return get_method(request.param)


def _inputs(spec: MethodSpec, shape=(4, 6), dtype=torch.float32, seed=0):
    """Two fine-tunes of a base as the catalog pairs them (pair_roles): (inputs, base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    a, b = (base + 0.1 * torch.randn(shape, generator=g) for _ in range(2))
    inputs, b0 = pair_roles(spec, [a.to(dtype), b.to(dtype)], shared_base=base.to(dtype))
    return inputs, b0


def _merge(spec, params=None, seed=0, **kw):
    inputs, base = _inputs(spec, **kw)
    return merge_tensors(spec.name, inputs, base, params, seed=seed, tensor_name="t")


def _sparse(spec) -> dict:
    """Parameters under which a random method actually draws (density below 1)."""
    names = {p.name for p in spec.params}
    return {"density": 0.5} if "density" in names else {}


def test_every_method_module_defines_a_registered_spec():
    """Discovery: each module of simmerge_bandit/methods (but the helpers) is a registered method, so a module
    that forgot SPEC, or that nothing imports, is caught here."""
    for name in method_modules():
        spec = getattr(importlib.import_module(f"simmerge_bandit.methods.{name}"), "SPEC", None)
        assert isinstance(spec, MethodSpec), f"methods/{name}.py defines no SPEC"
        assert REGISTRY.get(spec.name) is spec
    assert len(method_modules()) == len(method_names()) >= 12


def test_parameters_are_declared_with_bounds(spec):
    for p in spec.params:
        assert p.kind in ("float", "int", "bool") and p.scope in ("global", "model")
        assert p.coerce(p.default) == p.default
        if p.kind != "bool":
            assert math.isfinite(p.low) and math.isfinite(p.high) and p.low < p.high
            lo, hi = p.describe_range()
            assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    descriptor.check_registry(REGISTRY)  # shared names share their span


def test_parameters_are_validated(spec):
    assert spec.validate({}) == spec.defaults()
    with pytest.raises(InvalidInput, match="no parameter"):
        spec.validate({"no_such_parameter": 1})
    for p in spec.params:
        if p.kind == "bool":
            bad = ["maybe", 2, 0.5]
        else:
            width = p.high - p.low
            bad = [p.low - width, p.high + width, 1e200, -1e308, float("nan"), float("inf"), "abc", True]
            bad += [p.low] if not p.low_inclusive else []
            bad += [p.high] if not p.high_inclusive else []
        for v in bad:
            with pytest.raises(InvalidInput, match=p.name):
                spec.validate({p.name: v})
            with pytest.raises(InvalidInput, match=p.name):
                _merge(spec, {p.name: v})


def test_deterministic_per_seed(spec):
    params = _sparse(spec)
    first = _merge(spec, params, seed=3)
    assert torch.equal(first, _merge(spec, params, seed=3))
    if spec.random:
        assert not torch.equal(first, _merge(spec, params, seed=4))


@pytest.mark.parametrize("shape, dtype", [((7,), torch.bfloat16), ((4, 6), torch.float16), ((2, 3, 5), torch.float32)])
def test_shapes_and_dtypes_are_kept(spec, shape, dtype):
    out = _merge(spec, _sparse(spec), shape=shape, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_bad_input_is_refused(spec):
    inputs, base = _inputs(spec)
    wrong = [*inputs[:-1], torch.zeros(5, 6)]
    with pytest.raises(InvalidInput, match="shape"):
        merge_tensors(spec.name, wrong, base)
    nan = inputs[-1].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        merge_tensors(spec.name, [*inputs[:-1], nan], base)
    with pytest.raises(InvalidInput):
        merge_tensors(spec.name, [], base)
    if spec.needs_base and spec.base_role == "separate":
        with pytest.raises(InvalidInput, match="base"):
            merge_tensors(spec.name, inputs, None)


def test_the_descriptor_describes_it_finitely(spec):
    schema = descriptor.current()
    z = schema.describe({"method": spec.name, "params": {}})
    assert z.shape == (len(schema),) and ((0 <= z) & (z <= 1)).all()
    assert z[schema.index[f"method:{spec.name}"]] == 1 and z[schema.index[f"family:{spec.family}"]] == 1
    for p in spec.params:  # the extremes of every valid range stay in [0, 1]
        if p.kind != "bool" and p.describe:
            for v in (p.low, p.high):
                zz = schema.describe({"method": spec.name, "params": {p.name: v}})
                assert ((0 <= zz) & (zz <= 1)).all()


def test_methods_have_distinct_descriptors(example):
    schema = descriptor.current()
    seen = {}
    for name in METHODS:
        key = tuple(schema.describe({"method": name, "params": {}}))
        assert key not in seen, f"{name} and {seen.get(key)} look the same to the policies"
        seen[key] = name


def test_the_worked_example_of_the_docs_runs(example):
    """docs/extending/merge-method.md: its module block is the method registered here, its plugin block runs
    (and registers/unregisters the same SPEC), and the method merges what its docstring says."""
    base, a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    out = merge_tensors("demo_lerp", [a, b], base, {"alpha": 0.5})
    assert torch.equal(out, torch.ones(3))
    unregister("demo_lerp")
    try:
        exec(compile(doc_blocks()[1], str(DOC), "exec"), {"SPEC": example})
        assert "demo_lerp" not in REGISTRY
    finally:
        register(example)
    with pytest.raises(InvalidInput, match="registered already"):
        register(MethodSpec(name="demo_lerp", family="demo", params=(), needs_base=True, merge=example.merge))


def test_register_refuses_a_method_that_breaks_the_schema(example):
    clash = MethodSpec(name="clash", family="demo", needs_base=False, base_role="none",
                       params=(ParamSpec("alpha", "float", 0.5, low=0.0, high=4.0),), merge=example.merge)
    with pytest.raises(InvalidInput, match="span"):
        register(clash)
    assert "clash" not in REGISTRY
    with pytest.raises(ValueError, match="finite bounds"):
        ParamSpec("unbounded", "float", 1.0)
    with pytest.raises(InvalidInput, match="kernel"):
        register(MethodSpec(name="nokernel", family="demo", params=(), needs_base=False))
