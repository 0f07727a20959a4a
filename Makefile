# Two commands: `make demo` and `make test`. Everything else here is what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The ephemeral API's default 20 s start-up limit is too short on a busy 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180

.PHONY: demo test test-fast lint fmt venv model browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU wheel of torch first, so nothing pulls the multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train,dev]"
	touch $(STAMP)

# TRL 1.14 removed PRMTrainer; the prm/ dataset's test trains TRL 1.13's, from this side directory (no deps).
$(VENV)/trl-prm/.installed: $(STAMP)
	$(BIN)/pip install -q --no-deps --target $(VENV)/trl-prm trl==1.13.0
	touch $@

venv: $(STAMP)

model: $(STAMP)
	$(BIN)/ckptdpo models pull-demo

# Debian's Chromium, for the report and Prefect UI checks; installed only when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# One torch thread per process: on 2 cores next to the Prefect API and the verifier's workers, two threads per
# process spin-wait and slow each other down (the backend already sets one; training and GRPO read this).
demo: model
	OMP_NUM_THREADS=1 $(BIN)/ckptdpo demo

test: model browser $(VENV)/trl-prm/.installed
	$(BIN)/ruff check .
	# One torch thread per process: tests run next to Prefect servers and verifier workers on 2 cores.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15

# The unit tests alone (no Prefect server, no model): the edit-test loop, well under a minute.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/unit -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .prefect
