"""The documents a newcomer opens first agree with the code: version, licence, changelog, README images."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mailingestd import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_moves_together() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", changelog, re.MULTILINE)
    assert released and released[0] == __version__, "the newest CHANGELOG.md release is not __version__"
    for page in ("mailingestd.8", "mailingestctl.1", "mailingestd.toml.5"):
        header = (ROOT / "man" / page).read_text().splitlines()[0]
        assert f'"mailingestd {__version__}"' in header, f"{page}: {header}"


def test_license_is_the_declared_apache_2() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_readme_images_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert len(images) >= 4, "the bench plots are shown inline"
    for image in images:
        assert (ROOT / image).is_file(), image


CITED = re.compile(r"(?<![/\w.])((?:docs|bench|examples|etc|man|systemd)/[\w./-]+\.(?:md|json|toml|py|[158]|service))\b"
                   r"|\b([A-Z]{3,}[A-Z_]*\.md)\b")


def test_every_document_the_code_and_docs_cite_is_in_the_repository() -> None:
    """Users have only the repository: a comment or page citing a file outside it (or a 'SPEC
    section') points at nothing."""
    sources = [*ROOT.glob("mailingestd/**/*.py"), *ROOT.glob("docs/*.md"), *ROOT.glob("man/*.[158]"),
               ROOT / "README.md", ROOT / "etc" / "mailingestd.toml", *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.md")]
    missing = []
    for source in sources:
        text = source.read_text(errors="replace")
        assert "SPEC section" not in text, f"{source.relative_to(ROOT)} cites a SPEC section"
        for match in CITED.finditer(text):
            cited = match.group(1) or match.group(2)
            if not (ROOT / cited).exists() and not (ROOT / cited.lstrip("./")).exists():
                missing.append(f"{source.relative_to(ROOT)}: {cited}")
    assert not missing, missing
