"""README's notebook example runs as written, on the tiny trajectory and fewer steps."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    block = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```\n<!-- /{marker} -->", text, re.S)
    assert block, f"README.md lost its {marker} block"
    return block.group(1)


def test_notebook_example_trains_and_saves(tiny_trajectory_folder, tmp_path, monkeypatch):
    code = readme_block("readme-example")
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
        assert old in code, f"README example no longer contains {old!r}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    from study.lm.pretrain_config import TINY

    namespace = {"TINY": TINY, "CACHE": tiny_trajectory_folder.parent.parent}
    exec(compile(code, "README.md", "exec"), namespace)
    result, same = namespace["result"], namespace["same"]
    assert namespace["activations"].shape[1:] == (len(TINY.checkpoint_steps()), TINY.hidden_size)
    assert result.model.decoder_norms().shape == (8 * TINY.hidden_size, len(TINY.checkpoint_steps()))
    assert 0 < result.metrics.explained_variance <= 1
    assert (tmp_path / "crosscoder.safetensors").is_file() and same.config == result.model.config


def test_readme_states_every_claim_rule_as_the_record_does():
    from study.record import CLAIMS, SHARED_RULES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for claim in CLAIMS:
        assert f"| `{claim.claim}` | {claim.paper_claim} | `{claim.statistic}` | {claim.rule} |" in readme, claim.claim
    assert SHARED_RULES in readme
    assert "DESIGN.md" not in readme  # the claims live in the project, not in a file outside it
