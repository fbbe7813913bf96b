"""Host functions that compiled ONNX graphs call by name, for processes that load TVM's runtime library only.

A few Relax operators have no TIR kernel: their output shape depends on the data (``Unique``, ``NonZero``)
or they turn a shape into a tensor. TVM's VM calls them as global functions (``relax.run.unique`` ...),
which TVM registers from its compiler-side Python package — absent where ``xpuc run`` loads only the
runtime library. :func:`register_missing` registers the same functions, with the same arguments and
results, when they are missing; where TVM's own are present they are left in place.
"""

from __future__ import annotations

import numpy as np


def shape_to_tensor(shape):
    import tvm

    return tvm.runtime.tensor(np.array([int(v) for v in shape], dtype=np.int64))


def nonzero(x):
    import tvm

    idx = np.atleast_1d(x.numpy()).nonzero()
    return tvm.runtime.tensor(np.stack(idx, axis=0).astype(np.int64))


def unique(x, is_sorted: int, return_index: int, return_inverse: int, return_counts: int, axis=None):
    """ONNX ``Unique``: values (sorted, or in order of first occurrence), then the requested index,
    inverse and counts tensors; one tensor when none is requested."""
    import tvm

    a = x.numpy()
    values, index, inverse, counts = np.unique(a, return_index=True, return_inverse=True, return_counts=True,
                                               axis=None if axis is None else int(axis))
    inverse = inverse.reshape(-1)
    if not is_sorted:
        order = np.argsort(index, kind="stable")  # unique values by first occurrence
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        values = np.take(values, order, axis=0 if axis is None else int(axis))
        index, counts, inverse = index[order], counts[order], rank[inverse]
    outs = [values]
    for want, arr in ((return_index, index), (return_inverse, inverse), (return_counts, counts)):
        if want:
            outs.append(arr.astype(np.int64))
    if len(outs) == 1:
        return tvm.runtime.tensor(values)
    return [tvm.runtime.tensor(np.ascontiguousarray(o)) for o in outs]


FUNCTIONS = {"relax.run.shape_to_tensor": shape_to_tensor, "relax.run.nonzero": nonzero,
             "relax.run.unique": unique}


def register_missing() -> list[str]:
    """Register each of :data:`FUNCTIONS` that this process lacks; returns the names registered."""
    import tvm

    added = []
    for name, fn in FUNCTIONS.items():
        if tvm.get_global_func(name, allow_missing=True) is None:
            tvm.register_global_func(name, fn)
            added.append(name)
    return added
