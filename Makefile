# Quick start: `make demo` (the whole workflow on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The exact versions tested together (tools/lock.py writes it); pyproject.toml has the ranges.
LOCK := constraints.txt
CONFIG ?= config/tiny.yaml
REPORT ?= results/report.html
# The embedded default and the tests never touch the hub (open_clip would retry it for ~46 s).
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test lint dry-run study-dry-run report clean world world-quality

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) --editable .
	touch $@

demo: $(VENV)/.installed
	$(BIN)/snakemake --profile profiles/local --configfile $(CONFIG)
	$(BIN)/snakemake --configfile $(CONFIG) --report $(REPORT)
	@echo "conceptbench: summary in results/tables/summary.md, report in $(REPORT)"

# The tests (the `test` extra) also cover the optional 8-bit AdamW (the `8bit` extra, bitsandbytes).
$(VENV)/.installed-8bit: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --constraint $(LOCK) --editable '.[8bit,test]'
	touch $@

test: $(VENV)/.installed-8bit
	$(BIN)/python -m pytest --durations=15

# The toy world's models, trained from scratch on the CPU and exported (fp16) to the repository's copy.
# Stages whose folder exists in $(WORLD_BUILD) are kept: delete one to rebuild it.
WORLD_BUILD ?= resources/world-build
world: $(VENV)/.installed
	$(BIN)/python -m conceptbench.world.build $(WORLD_BUILD) --parallel --ship src/conceptbench/world/models

# The shipped models against the toy world's quality bars, as one table.
world-quality: $(VENV)/.installed
	$(BIN)/python -m conceptbench.world.quality

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint --configfile $(CONFIG)

dry-run: $(VENV)/.installed
	$(BIN)/snakemake -n --configfile $(CONFIG)

study-dry-run: $(VENV)/.installed
	$(BIN)/snakemake -n

report: $(VENV)/.installed
	$(BIN)/snakemake --configfile $(CONFIG) --report $(REPORT)

clean:
	rm -rf results resources .snakemake
