"""The front end stays torch-free: gateway/ and chat/ must never import torch (or modules
that pull it in), so they start fast and run where no GPU stack is installed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FORBIDDEN = ("torch", "triton", "transformers", "engine", "kernels")
ROOTS = ("gateway", "chat")


def violations(root: Path) -> list[str]:
    out = []
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    out.append(f"{file}:{node.lineno}: imports {name}")
    return out


def main() -> int:
    found = [v for r in ROOTS if Path(r).is_dir() for v in violations(Path(r))]
    for v in found:
        print(v)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
