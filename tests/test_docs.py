"""The documentation holds: the front page stays a front page, every link resolves, the notebook example runs
as written, the claims page states the record's rules, and the record is the one place a logged name is spelt."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "bench" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def fenced_block(page: Path, marker: str) -> str:
    block = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```\n<!-- /{marker} -->", page.read_text(), re.S)
    assert block, f"{page.name} lost its {marker} block"
    return block.group(1)


def test_notebook_example_trains_and_saves(tiny_trajectory_folder, tmp_path, monkeypatch):
    code = fenced_block(ROOT / "docs" / "crosscoder.md", "readme-example")
    # The same code on the tiny trajectory: only sizes change.
    replacements = {
        "embedded_trajectory()": "embedded_trajectory(TINY, CACHE)",
        "generate_documents(2000, seed=7)": "generate_documents(200, seed=7)",
        "context_length=64": "context_length=32",
        "activations[:-8192], activations[-8192:]": "activations[:-1024], activations[-1024:]",
        "n_steps=1500, batch_size=1024": "n_steps=60, batch_size=256",
        "progress=True": "progress=False",
    }
    for old, new in replacements.items():
        assert old in code, f"the notebook example no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    from study.lm.pretrain_config import TINY

    namespace = {"TINY": TINY, "CACHE": tiny_trajectory_folder.parent.parent}
    exec(compile(code, "docs/crosscoder.md", "exec"), namespace)
    result, same = namespace["result"], namespace["same"]
    assert namespace["activations"].shape[1:] == (len(TINY.checkpoint_steps()), TINY.hidden_size)
    assert result.model.decoder_norms().shape == (8 * TINY.hidden_size, len(TINY.checkpoint_steps()))
    assert 0 < result.metrics.explained_variance <= 1
    assert (tmp_path / "crosscoder.safetensors").is_file() and same.config == result.model.config


def test_the_claims_page_states_every_claim_rule_as_the_record_does():
    from study.record import CLAIMS, SHARED_RULES

    page = (ROOT / "docs" / "claims.md").read_text()
    for claim in CLAIMS:
        assert f"| `{claim.claim}` | {claim.paper_claim} | `{claim.statistic}` | {claim.rule} |" in page, claim.claim
    assert SHARED_RULES in page


def test_the_front_page_is_short_and_every_link_resolves():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    for page in PAGES:
        text = page.read_text()
        # The project is self-contained: no page sends a reader to a file outside it (the names are assembled
        # here so that this test does not cite them itself).
        outside = ("../" + "shared", "DESIGN" + ".md", "STACK" + "_NOTES", "FIELD" + "_NOTES")
        assert not any(name in text for name in outside), page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_defaults_yaml_repeats_the_crosscoder_defaults_exactly():
    from crosscoder import CrossCoderConfig

    defaults = yaml.safe_load((ROOT / "search_spaces" / "defaults.yaml").read_text())
    default_config = CrossCoderConfig()
    for key, value in defaults.items():
        if hasattr(default_config, key):
            assert getattr(default_config, key) == value, f"defaults.yaml {key}: {value} against CrossCoderConfig"


def spelt_names(path: Path, names: set[str]) -> list[str]:
    """The plain string literals of ``path`` that are one of ``names``."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [
        f"{path.relative_to(ROOT)}:{token.start[0]} {token.string}"
        for token in tokens
        if token.type == tokenize.STRING and token.string[1:-1] in names and token.string[0] in "\"'"
    ]


def test_no_module_but_the_record_spells_a_logged_name():
    from study.record import TAG, TRIAL_RESULT, CausalCurves, PlantedSummary, TrialCurves, TrialSummary

    names = {*TrialSummary._fields, *TrialCurves._fields, *CausalCurves._fields, *PlantedSummary._fields}
    names |= set(TAG) | set(TRIAL_RESULT)
    sources = [path for package in ("study", "reports") for path in (ROOT / package).rglob("*.py")]
    spelt = [found for path in sources if path.name != "record.py" for found in spelt_names(path, names)]
    assert not spelt, "spell these through study.record (METRIC, TAG, TRIAL_RESULT): " + ", ".join(spelt)


def test_a_trial_logs_every_causal_figure_in_its_summary_and_curves():
    from study.record import CausalCurves, CausalSummary, TrialCurves, TrialSummary

    # claim_statistics splats the causal parts into the trial's: a field missing there fails every trial.
    assert set(CausalSummary._fields) <= set(TrialSummary._fields)
    assert set(CausalCurves._fields) <= set(TrialCurves._fields)
