"""Relax passes of xpuc, one per module."""
