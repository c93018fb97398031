# Two commands a new user needs: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-numerics install clean bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/solarmap demo --out-dir demo-out

test: $(STAMP)
	$(PY) -m pytest -q

# The tests that compare model outputs, again on the portable kernels and one thread: another CPU
# sums float32 in another order, and these must hold on every machine, not only ours (CI runs it).
NUMERICS_TESTS := tests/test_cam.py tests/test_model.py tests/test_pseudoseg.py tests/test_end_to_end.py tests/test_outline.py
test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS)

bench: $(STAMP)
	$(PY) scripts/bench_tiling.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
