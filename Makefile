# Two commands on a fresh machine with Python 3.11, pip and make:
#   make run   - install into .venv/ and start the app (SQLite file, shipped model, sample cases)
#   make test  - install into .venv/ and run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: install run test lint browser postgresql dicom-tools bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

# The ONNX file of the model first (once; ~15 s): INFMAP_ENGINE=auto then serves it with ONNX
# Runtime. If it cannot be built, torch serves and the app starts all the same.
run: install
	-$(PY) -m inference.onnx_engine > /dev/null
	$(VENV)/bin/streamlit run app.py

# Browser tests need Debian's chromium; installed here when we may (root with apt-get).
browser:
	@bash scripts/ensure_chromium.sh

# The database tests also run on a PostgreSQL server they start themselves: Debian's postgresql.
postgresql:
	@bash scripts/ensure_postgresql.sh

# DICOM tests need Debian's dicom3tools, dcmtk and Orthanc (+ DICOMweb); installed the same way.
dicom-tools:
	@bash scripts/ensure_dicom_tools.sh

test: install browser postgresql dicom-tools
	$(PY) -m pytest

# ruff over everything; mypy over the typed layers (settings, database, inference, services,
# training: see [tool.mypy] in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m benchmarks.inference_latency
