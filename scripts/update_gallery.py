"""Copy the README gallery's figures out of the committed notebooks.

Each ``docs/gallery/<name>.png`` is an ``image/png`` output of ``notebooks/<name>.ipynb``
(the first one, unless :data:`FIGURE` names another), taken byte for byte so the gallery shows
exactly what the notebook's full-size run drew. ``tests/test_readme.py`` checks the copies
are current.

Usage: ``python scripts/update_gallery.py`` (after ``make notebooks``).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GALLERY = ROOT / "docs" / "gallery"
FIGURE: dict[str, int] = {}
"""Index of the notebook's PNG output a gallery image shows, where it is not the first."""


def notebook_pngs(notebook: Path) -> list[bytes]:
    """Every ``image/png`` output of ``notebook``, in cell order, decoded."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [base64.b64decode(out["data"]["image/png"])
            for cell in cells if cell["cell_type"] == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def gallery_source(image: Path) -> bytes:
    """The notebook output that ``docs/gallery/<name>.png`` shows."""
    pngs = notebook_pngs(ROOT / "notebooks" / f"{image.stem}.ipynb")
    index = FIGURE.get(image.stem, 0)
    if index >= len(pngs):
        raise ValueError(f"{image.stem}.ipynb has {len(pngs)} image outputs; the gallery wants "
                         f"number {index}: run `make notebooks` first")
    return pngs[index]


def main() -> int:
    for image in sorted(GALLERY.glob("*.png")):
        data = gallery_source(image)
        if image.read_bytes() != data:
            image.write_bytes(data)
            print(f"updated {image.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
