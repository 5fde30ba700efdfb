# The two commands for a fresh clone, `make demo` and `make test`. Each creates or reuses .venv,
# installs torch 2.13.0 first (the CPU wheel; a bare `torch` requirement would pull CUDA
# builds), then the project with the extras it needs, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-lm test test-container lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$*]'
	touch $@

# The whole pipeline on scikit-learn's bundled digits: teacher, teacher-serve, teacher-push,
# offline-distill with and without the teacher, a table and demo-out/.
demo: $(VENV)/.installed-demo
	$(BIN)/distill-demo --out demo-out

# The same pipeline on a language model, on the CPU in under 10 minutes: a BPE tokenizer and a
# GPT-2 teacher trained on the Python standard library's own source, teacher-serve --targets
# topk:16, offline-distill --task lm with and without the teacher, perplexities and demo-lm-out/.
# `.installed-demo,lm` installs '.[demo,lm]' (the pattern rule above).
demo-lm: $(VENV)/.installed-demo,lm
	$(BIN)/distill-demo --task lm --out demo-lm-out

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest -q

# The image built and run for real: podman from Debian's packages and a local base image (no
# registry needed; ../shared/container/setup.sh). About 4 minutes the first time, 20 s after.
test-container: $(VENV)/.installed-test
	eval "$$(../shared/container/setup.sh)" && KD_CONTAINER_TESTS=1 $(BIN)/python -m pytest -q tests/test_container.py

clean:
	rm -rf $(VENV) runs demo-out demo-lm-out .pytest_cache
