# The two commands of the README: `make demo` and `make test`. Everything installs from requirements.lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak bench lock clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/metering demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The fault harness on its heavy seed set, the full 8 x 5,000 load, the import under a fault at every statement
# and 2,000 generated request bodies against their holds.
soak: $(STAMP)
	METERING_SOAK=1 $(BIN)/python -m pytest tests/test_faults.py tests/test_load.py tests/test_redteam_import.py \
		tests/test_redteam_holds.py

bench: $(STAMP)
	$(BIN)/python bench/bench_counting.py
	$(BIN)/python bench/bench_pricing.py
	$(BIN)/python bench/bench_ledger.py
	$(BIN)/python bench/bench_reconcile.py
	$(BIN)/python bench/bench_export.py
	$(BIN)/python bench/bench_relay.py
	$(BIN)/python bench/bench_relay_body.py
	$(BIN)/python bench/bench_import.py

# Re-pin after changing dependencies in pyproject.toml: resolves in a scratch venv, writes requirements.lock.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check '.[dev]'
	.lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(llm-metering|pip)\b' > requirements.lock
	rm -rf .lock-venv build

clean:
	rm -rf $(VENV) build *.egg-info
