"""Test set-up: the CPU shims for megatron-core are installed once here, before any test module imports
megatron-core (no package module installs them as an import side effect; see vapo_megatron/platform)."""
from vapo_megatron import platform

platform.install_shims()
