"""Print the requirements of the project's base dependencies plus the given extras.

pyproject.toml stays the one list of dependencies; the Dockerfile installs them from this output
(with docker/constraints.txt pinning every version) in a layer built before any code is copied.

    python docker/requirements.py gpu            # serving image
    python docker/requirements.py cpu openvino export  # export image
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text("utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml defines {sorted(optional)}")
    result = list(project["dependencies"])
    for extra in extras:
        result.extend(optional[extra])
    return result


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
