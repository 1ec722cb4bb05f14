"""Multi-file containers that wrap disks: OVF descriptors and OVA packages.

``ovf`` maps a descriptor (DMTF DSP0243) to and from the virtual hardware model;
``ova`` reads and writes the tar package around it, safely.
"""
