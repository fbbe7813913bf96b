"""xpuc.compiler.tuning: search for faster schedules of a model's kernels (databases, workloads, device farms).

Tuning compiles each workload with the compiler's pipeline, so it sits in the compiler layer, above the kernels.
"""
