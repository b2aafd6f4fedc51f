"""Measured kexec: the machine's own TPM and event log carried across a vmrun kexec."""
