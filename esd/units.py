"""Units of size the project reads from flags and prints.

Owns: `GB`, the gigabyte of `--disk_budget GB` and of every size the tool prints in GB, and
`gigabytes`, the flag's type:
10^9 bytes, as docs/interface.md and the flag's help say. Every module converts with this
one constant. Must not import anything (the setup doctor uses it before dependencies are
checked).
"""
GB = 1000 ** 3
MB = 1000 ** 2


def gigabytes(text) -> float:
    """`--disk_budget GB`: a number of gigabytes (10^9 bytes) > 0."""
    import argparse
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GB > 0, got {text!r}")
    return value
