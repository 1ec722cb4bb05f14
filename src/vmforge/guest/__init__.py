"""Inside the disk: partition tables (and, later, file systems, sysprep, secret scan)."""
