"""Identity property over every gold answer in the shared data folder: the gold, boxed, verifies `correct`.

36 of the 10,207 golds (currency `\\$` ones) failed this before issue 12, so every trajectory for those problems was
labelled wrong. About 30 s on 2 cores, hence slow.
"""

from __future__ import annotations

import pytest

from ckptdpo.verify import verify_batch
from tests.unit.test_verify_answers import DATA_FILES, all_golds


@pytest.mark.slow
@pytest.mark.skipif(not DATA_FILES, reason="no shared data folder")
def test_every_boxed_gold_verifies_against_itself() -> None:
    golds = all_golds()
    assert len(golds) == 10_207
    template = "<think>\nLet me work it out.\n</think>\n\n**Final Answer**\n\\[\n\\boxed{{{}}}\n\\]"
    items = [(g, template.format(g)) for g in golds]
    verdicts = verify_batch(items, timeout_s=10.0)
    failed = [(g, v) for g, v in zip(golds, verdicts, strict=True) if v.status != "correct"]
    assert failed == []
    assert {v.extracted_from for v in verdicts} == {"box"}
