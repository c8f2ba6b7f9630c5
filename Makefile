# raydetr: `make demo` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean venv rfdetr-reference

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/raydetr demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check raydetr jobs tests bench

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

# RF-DETR's own code in a scratch dir outside the repo (bench/rfdetr_step.py, rfdetr_trajectory.py)
RFDETR_REF ?= /tmp/rfdetr-ref
rfdetr-reference:
	@test -n "$(RFDETR_REPO)" || { echo "usage: make rfdetr-reference RFDETR_REPO=/path/to/rf-detr-clone"; exit 2; }
	bench/setup_rfdetr_reference.sh $(RFDETR_REPO) $(RFDETR_REF)

clean:
	rm -rf runs .pytest_cache
