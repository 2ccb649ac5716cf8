"""MkDocs hook: the nav lists pages that other branches add (``extra.optional_pages``); drop those
that are not there yet, and add every other page under docs/benchmarks/ to the Benchmarks section,
so a new generated table is in the nav and a missing optional page breaks no strict build."""

from __future__ import annotations

import re
from pathlib import Path

#: The docstrings' Sphinx roles (:func:`x`, :class:`~a.b.C`) as mkdocstrings renders them: the role stays as text.
ROLE = re.compile(r":(?:py:)?(?:mod|func|class|meth|attr|data|exc|obj|const):(<code>)~?([^<]*?)(</code>)")


def _prune(nav: list, present, optional: set[str]) -> list:
    kept = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            kept.append({next(iter(item)): _prune(value, present, optional)})
        elif not (isinstance(value, str) and value in optional and not present(value)):
            kept.append(item)
    return kept


def _listed(nav: list) -> set[str]:
    pages = set()
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages |= _listed(value) if isinstance(value, list) else {value}
    return pages


def on_config(config):
    docs = Path(config["docs_dir"])
    optional = set(config["extra"].get("optional_pages", []))
    nav = _prune(config["nav"], lambda page: (docs / page).is_file(), optional)
    listed = _listed(nav)
    extra = sorted(f"benchmarks/{p.name}" for p in (docs / "benchmarks").glob("*.md")
                   if f"benchmarks/{p.name}" not in listed)
    for item in nav:
        if isinstance(item, dict) and "Benchmarks" in item:
            item["Benchmarks"].extend(extra)
    config["nav"] = nav
    return config


def _short(match: re.Match) -> str:
    name = match[2]
    return f"{match[1]}{name}{match[3]}"


def on_page_content(html, page, config, files):
    """Drop the Sphinx role prefix of the docstrings' cross-references, keeping the name in code."""
    return ROLE.sub(_short, html)
