"""SpecializeSequenceBuckets: Before/Expected in TVMScript, numerics of every copy against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from xpuc.compiler.passes.specialize_buckets import SpecializeSequenceBuckets


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "seq", 4), "float32"),
             w: R.Tensor((4, 4), "float32")) -> R.Tensor((1, "seq", 4), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, x)
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, "seq", 4), "float32"),
             w: R.Tensor((4, 4), "float32")) -> R.Tensor((1, "seq", 4), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, x)
            R.output(z)
        return z

    @R.function
    def main_seq2(x: R.Tensor((1, 2, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((1, 2, 4), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, x)
            R.output(z)
        return z

    @R.function
    def main_seq8(x: R.Tensor((1, 8, 4), "float32"), w: R.Tensor((4, 4), "float32")) -> R.Tensor((1, 8, 4), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            z = R.add(y, x)
            R.output(z)
        return z


def test_structure():
    after = SpecializeSequenceBuckets((8, 2))(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_no_buckets_or_no_symbolic_dim_is_identity():
    tvm.ir.assert_structural_equal(SpecializeSequenceBuckets(())(Before), Before)
    static = SpecializeSequenceBuckets((2,))(Expected)  # main has "seq" -> would add; use a static module
    assert "main_seq2" in [gv.name_hint for gv in static.get_global_vars()]
    only_static = tvm.IRModule({"main": Expected["main_seq8"].with_attr("global_symbol", "main")})
    tvm.ir.assert_structural_equal(SpecializeSequenceBuckets((2,))(only_static), only_static)


def test_every_function_matches_numpy():
    mod = SpecializeSequenceBuckets((2, 8))(Before)
    ex = relax.build(mod, target="llvm") if hasattr(relax, "build") else tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    for name, n in (("main", 5), ("main_seq2", 2), ("main_seq8", 8)):
        x = rng.standard_normal((1, n, 4)).astype(np.float32)
        out = vm[name](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
        np.testing.assert_allclose(out, x @ w + x, rtol=1e-5, atol=1e-5)


def test_static_copy_rejects_other_lengths():
    ex = tvm.compile(SpecializeSequenceBuckets((2,))(Before), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.zeros((1, 3, 4), np.float32)
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        vm["main_seq2"](tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((4, 4), np.float32)))
