"""docs/language.md: its generated tables match the registries, every registry entry is described,
and every example in it runs (models check; each mistake gives the message shown)."""
from __future__ import annotations

import re

import pytest

import ppl
from ppl import distributions as DS
from ppl import functions as FN
from ppl import langdoc
from ppl.errors import PplError
from ppl.frontend.check import DATA_TYPES, LATENT_TYPES
from ppl.frontend.hints import warnings

TEXT = open(langdoc.DOC, encoding="utf-8").read()


def test_generated_sections_are_up_to_date():
    assert langdoc.splice(TEXT) == TEXT, "run: python -m ppl.langdoc"
    assert langdoc.main(["--check"]) == 0


def test_every_registry_entry_is_described():
    assert set(langdoc.DIST_MEANING) == set(DS.REGISTRY)
    assert set(langdoc.FUNCTION_MEANING) == set(FN.REGISTRY)
    assert set(langdoc.LATENT_TYPES_DOC) == set(LATENT_TYPES)
    assert set(langdoc.DATA_TYPES_DOC) == set(DATA_TYPES)
    for name in list(DS.REGISTRY) + list(FN.REGISTRY):
        assert f"`{name}(" in TEXT, name


def _blocks():
    """(marker, model text, expected text) for each ```ppl block (marker: error, warning or None)."""
    pat = re.compile(r"(?:<!-- (error|warning) -->\n)?```ppl\n(.*?)```\n(?:```text\n(.*?)```)?", re.S)
    return [(m.group(1), m.group(2), m.group(3)) for m in pat.finditer(TEXT)]


BLOCKS = _blocks()


def test_the_document_has_examples_and_mistakes():
    kinds = [b[0] for b in BLOCKS]
    assert kinds.count(None) >= 5 and kinds.count("error") >= 8 and kinds.count("warning") >= 1


@pytest.mark.parametrize("kind,text,expected", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_example(kind, text, expected):
    m = None
    if kind == "error":
        with pytest.raises(PplError) as e:
            ppl.loads(text, "example.ppl").check()
        assert e.value.render().strip() == expected.strip()
        return
    m = ppl.loads(text, "example.ppl")
    model = m.check()
    assert any(n.kind in ("latent", "param") for n in model.nodes.values())
    notes = [w.render() for w in warnings(m.program)]
    if kind == "warning":
        assert "\n".join(notes).strip() == expected.strip()
    else:
        assert notes == []
