"""Downloaded files are data, never code: no pickle loads, no remote code, pinned hub downloads,
and configs and captions read as plain data."""

import re
from pathlib import Path

import yaml

from conceptbench import config as cb

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "workflow").rglob("*.py"), *(ROOT / "workflow").rglob("*.smk")])


def _code_lines():
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(ROOT)}:{n}", code


def test_the_scan_sees_the_code():
    assert len(SOURCES) > 20 and any("torch.load" in code for _, code in _code_lines())


def test_no_unsafe_deserialisation_or_remote_code():
    bad = []
    for where, code in _code_lines():
        if re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(|\byaml\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(", code):
            bad.append(where)
        if "torch.load(" in code and "weights_only=True" not in code:
            bad.append(where)
        if re.search(r"trust_remote_code\s*=\s*True", code):
            bad.append(where)
    assert not bad, f"unsafe loads or remote code at {bad}"


def test_every_hub_model_is_pinned_to_a_commit():
    cfg = cb.load(ROOT / "config/config.yaml")
    for name, spec in cfg["models"].items():
        assert re.fullmatch(r"[0-9a-f]{40}", spec["revision"]), name
    for name, spec in cfg["datasets"].items():
        assert spec["revision"] == "main" or re.fullmatch(r"[0-9a-f]{40}", spec["revision"]), name


def test_config_values_are_data(tmp_path):
    # A YAML tag that would build a Python object is refused, not executed.
    path = tmp_path / "evil.yaml"
    path.write_text("experiments: !!python/object/apply:os.system ['touch " + str(tmp_path / "owned") + "']\n")
    try:
        cb.load(path)
    except cb.ConfigError as e:
        assert "cannot read the config" in str(e)
    assert not (tmp_path / "owned").exists()
    # A prompt that looks like code is kept verbatim.
    cfg = yaml.safe_load((ROOT / "config/tiny.yaml").read_text())
    cfg["experiments"]["dreambooth"]["prompts"] = ["sks dog __import__('os').system('x')"]
    cfg = cb.validate(cfg)
    assert cb.eval_prompts(cfg["experiments"]["dreambooth"])[0]["prompt"] == "sks dog __import__('os').system('x')"
