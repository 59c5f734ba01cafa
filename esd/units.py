"""Units of size the project reads from flags and prints.

Owns: `GB`, the gigabyte of `--disk_budget GB` and of every size the tool prints in GB:
10^9 bytes, as docs/interface.md and the flag's help say. Every module converts with this
one constant. Must not import anything (the setup doctor uses it before dependencies are
checked).
"""
GB = 1000 ** 3
MB = 1000 ** 2
