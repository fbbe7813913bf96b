"""Relax/TIR passes of xpuc, one per module."""

#: The mark of a PrimFunc that needs no further scheduling: hand-written kernels carry it, every scheduling pass
#: sets it and skips what has it (TVM 0.27's name, the one dlight and the meta-schedule integration read).
IS_SCHEDULED = "tirx.is_scheduled"
