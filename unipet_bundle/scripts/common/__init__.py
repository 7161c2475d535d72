"""The common floor: helpers every package may import (errors and the CLI wrapper, option parsing, weights I/O,
atomic writes, NIfTI geometry). Nothing here imports from another ``scripts`` package (see docs/code_map.md)."""
