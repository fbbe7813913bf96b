"""Test harness that does not ship with xpuc: GPU code checkers (OpenCL on pocl, CUDA via nvcc/NVRTC) and the
scripts the emulated-ARM tests run under QEMU user mode.

Run a checker from ``tests/``: ``cd tests && python -m support.cuda_check OUT_DIR``.
"""
