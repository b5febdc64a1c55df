"""docs/protocol.md agrees with config/config.yaml: every row's value is the config's (or the default the
config leaves implicit), and every value-shaping key of the config has a row."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from conceptbench import config as cb

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "protocol.md"
CONFIG = ROOT / "config" / "config.yaml"
COLUMNS = ["key", "value", "source", "deviation"]
# The config keys each section answers for, and whether the image-training defaults (IMPLICIT) need rows too.
SECTIONS = {
    "Models and metrics": (["models", "metrics"], False),
    "Evaluation and sampling": (["evaluation"], False),
    "DreamBooth": (["experiments.dreambooth"], True),
    "LoRA": (["experiments.lora"], True),
    "Textual Inversion": (["experiments.textual_inversion"], True),
    "Custom Diffusion": (["experiments.custom_diffusion", "experiments.custom_diffusion_multi"], True),
    "LCM distillation": (["experiments.lcm"], True),
    "DDPO": (["experiments.ddpo"], False),
}
# Keys that shape no number: when to checkpoint or log, what a run is called or is about, which file kind.
EXEMPT = {"checkpoint_every", "log_every", "enabled", "label", "task", "metrics", "method", "kind", "allow_patterns",
          "cache_latents"}
LEAF_MAPS = {"extra_phrases"}  # mappings keyed by free text: one row for the whole mapping
# Defaults an image-training experiment leaves implicit that shape its numbers: each needs a row too.
IMPLICIT = ["train.batch_size", "train.gradient_accumulation_steps", "train.lr_scheduler", "train.lr_warmup_steps",
            "train.scale_lr", "train.random_flip", "train.max_grad_norm", "train.adam_weight_decay",
            "train.mixed_precision", "train.optimizer", "resolution", "sampling.steps", "sampling.guidance_scale"]


def tables(text: str) -> dict[str, list[dict]]:
    """{section title: [row, ...]} of every `key | value | source | deviation` table."""
    out, section = {}, None
    for n, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            section = line[3:].strip()
            out.setdefault(section, [])
        elif line.startswith("|") and section is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells == COLUMNS or set("".join(cells)) <= set("-: "):
                continue
            assert len(cells) == 4, f"docs/protocol.md:{n}: a row has {len(cells)} cells, not 4: {line}"
            key, value = (c.strip("`") for c in cells[:2])
            out[section].append({"key": key, "value": yaml.safe_load(value), "raw": value, "source": cells[2],
                                 "line": n})
    return out


def lookup(tree, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def leaves(tree, prefix: str):
    """Dotted paths of the leaves under `prefix` (a list, or a LEAF_MAPS mapping, is one leaf)."""
    node = lookup(tree, prefix)
    if not isinstance(node, dict) or prefix.split(".")[-1] in LEAF_MAPS:
        yield prefix
        return
    for key in node:
        yield from leaves(tree, f"{prefix}.{key}")


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def protocol():
    return tables(PROTOCOL.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def given():
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def resolved():
    return cb.load(CONFIG)  # defaults filled: the schema's and each method's declared ones


def test_every_section_is_a_table_of_the_four_columns(protocol):
    assert set(SECTIONS) <= set(protocol), sorted(set(SECTIONS) - set(protocol))
    for rows in protocol.values():
        for row in rows:
            assert row["key"] and row["source"], f"docs/protocol.md:{row['line']}: key and source are required"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_each_row_states_the_configs_value(protocol, resolved, section):
    wrong = []
    for row in protocol.get(section, []):
        try:
            actual = lookup(resolved, row["key"])
        except KeyError:
            wrong.append(f"line {row['line']}: {row['key']} is no key of config/config.yaml (nor a default of it)")
            continue
        if not same(row["value"], actual):
            wrong.append(f"line {row['line']}: {row['key']} is {actual!r} in the config, "
                         f"{row['value']!r} in the protocol")
    assert not wrong, "docs/protocol.md disagrees with config/config.yaml:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_each_value_shaping_key_has_a_row(protocol, given, section):
    prefixes, implicit = SECTIONS[section]
    # a key may be stated in another section (every experiment's sampler is under "Evaluation and sampling")
    rows = {row["key"] for table in protocol.values() for row in table}
    needed = set()
    for prefix in prefixes:
        needed |= {k for k in leaves(given, prefix) if k.split(".")[-1] not in EXEMPT}
        if implicit:
            needed |= {f"{prefix}.{k}" for k in IMPLICIT}
    missing = sorted(needed - rows)
    assert not missing, f"docs/protocol.md, section {section}: no row for " + ", ".join(missing)


def test_the_parser_reads_values_as_yaml():
    text = "## X\n\n| key | value | source | deviation |\n|---|---|---|---|\n| `a.b` | `[1, 2.0e-3]` | s | |\n"
    assert tables(text)["X"][0]["value"] == [1, 0.002]


def test_each_key_has_one_row(protocol):
    """Two rows for one key could give it two sources (one of them wrong) and still both match the config."""
    where: dict[str, list[int]] = {}
    for rows in protocol.values():
        for row in rows:
            where.setdefault(row["key"], []).append(row["line"])
    twice = {key: lines for key, lines in where.items() if len(lines) > 1}
    assert not twice, f"docs/protocol.md states these keys more than once (lines): {twice}"
