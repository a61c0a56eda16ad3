# The two commands of the README: `make demo` (main job) and `make test`; `make docs` builds the site.
# Each creates .venv on first use, with the CPU build of torch the project is tested with.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0

.PHONY: demo test docs lint test-integrations bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test,demo,docs,lint]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m bnctl demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The checks a maintainer relies on (CI runs them after the tests): lint and the package's types.
lint: $(VENV)/.installed
	$(PY) -m ruff check src tests benchmarks examples docs/hooks conftest.py
	$(PY) -m mypy src/bnctl

# The documentation site (docs/, mkdocs.yml) into site/, offline; --strict: a broken link or reference fails.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Against the real torchvision, timm, onnxruntime and Lightning (a separate, large environment; not run by CI).
INT_VENV ?= .venv-integrations
INT_PY := $(INT_VENV)/bin/python

$(INT_VENV)/.installed: requirements-integrations.txt pyproject.toml
	$(PYTHON) -m venv $(INT_VENV)
	$(INT_PY) -m pip install -q -r requirements-integrations.txt
	$(INT_PY) -m pip install -q --no-deps -e .
	touch $@

# The fused Triton kernel (tests/test_kernels.py) runs there too, on the CPU under Triton's interpreter.
test-integrations: $(INT_VENV)/.installed
	$(INT_PY) -m pytest -q tests/integrations
	TRITON_INTERPRET=1 $(INT_PY) -m pytest -q -p no:cacheprovider tests/test_kernels.py
	$(INT_PY) -m pytest -q -p no:cacheprovider tests/test_compile.py -k inductor  # the newest torch's inductor too

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_host.py
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) $(INT_VENV) build site src/*.egg-info
