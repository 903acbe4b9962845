"""Builds the small cffi extension (memory fences and the syscalls Python lacks)."""

from setuptools import setup

setup(cffi_modules=["vhostfs/_native_build.py:ffibuilder"])
