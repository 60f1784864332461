"""guest_sim: the "VM" that migrator migrates.

A separate process that owns anonymous RAM and runs vCPU threads over it, like
a VM process does.  Its pages check themselves (index, version, CRC32), and the
version of every data page is kept in a table inside guest RAM, so a wrong,
stale or zero page is caught by the guest itself after a migration.
"""
