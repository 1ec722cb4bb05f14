"""Boot images in QEMU: accelerator choice, the QEMU machine over QMP, VM state directories.

This is the only package that starts QEMU system emulators (through ``util.run``).
"""
