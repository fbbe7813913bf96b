# Two entry points for a fresh machine:
#   make demo   install xpuc into .venv, fetch the bundled model, compile it for this host, generate text
#   make test   install xpuc with test extras into .venv, lint, run the test suite (two workers, one file each;
#               the bundled model and the arm64 sysroot are fetched first so that the workers never race for them)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export XPUC_CACHE ?= $(CURDIR)/.cache/xpuc
PROMPT ?= Explain in two sentences why phones need small language models.

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/xpuc compile smollm2-135m -o artifacts/smollm2-135m --device host --quantize q4_1 --force
	$(BIN)/xpuc run artifacts/smollm2-135m --chat --prompt "$(PROMPT)" --max-tokens 64

# lint-imports checks the layering (pyproject.toml, [tool.importlinter]) over the sources seen as the xpuc package
lint: $(VENV)/.installed
	$(BIN)/ruff check compiler runtime schedules targets tests benchmarks
	mkdir -p .cache/layers/xpuc
	for d in compiler runtime schedules targets; do ln -sfn $(CURDIR)/$$d .cache/layers/xpuc/$$d; done
	PYTHONPATH=.cache/layers $(BIN)/lint-imports --no-cache

test: $(VENV)/.installed lint
	bash .ci/system-deps
	$(BIN)/xpuc fetch smollm2-135m > /dev/null
	$(BIN)/python -c "from xpuc.targets.qemu import ensure_sysroot; ensure_sysroot(quiet=False)" \
	  || echo "xpuc: no arm64 sysroot; the emulated-ARM tests will be skipped"
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --durations=12

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/decode_dense.py

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
