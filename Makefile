# The README's two commands are the contract: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch wheels this machine kind keeps on local disk; override on other machines (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_ROOT ?= agssp_demo
export HF_HUB_OFFLINE ?= 1
export YOLO_OFFLINE ?= 1
export YOLO_AUTOINSTALL ?= 0

.PHONY: install system-deps demo test ui lint clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	# ultralytics pulls opencv-python (GUI build); both install the same cv2 package: keep the headless one only.
	$(PY) -m pip uninstall -q -y opencv-python || true
	$(PY) -m pip install -q --force-reinstall --no-deps "opencv-python-headless>=4.8"
	$(PY) -c "import agssp_pipeline, cv2, torch, torchvision, dagster, open_clip, ultralytics; print('installed: torch', torch.__version__, 'cv2', cv2.__version__, 'dagster', dagster.__version__)"
	touch $@

demo: install
	$(VENV)/bin/agssp demo --root $(DEMO_ROOT)

# Chromium, PostgreSQL and docker-compose for the integration tests; installs only what is missing and
# never fails the build (those tests skip with a reason where it cannot install). AGSSP_SKIP_SYSTEM_DEPS=1 skips.
system-deps:
	bash scripts/system_deps.sh

test: install system-deps
	$(VENV)/bin/python -m pytest tests

# The instance of the config it serves: DAGSTER_HOME defaults to <dir of AGSSP_CONFIG>/dagster_home, where
# agssp materialize records its runs (created with a dagster.yaml, telemetry off, when missing).
ui: install
	@config=$$(realpath "$${AGSSP_CONFIG:-$(CURDIR)/$(DEMO_ROOT)/agssp.yaml}"); \
	home=$${DAGSTER_HOME:-$$($(PY) -c 'import sys; from agssp_pipeline.orchestration import instance_home; print(instance_home(sys.argv[1]))' "$$config")}; \
	echo "serving $$config (Dagster instance $$home) on http://127.0.0.1:$${PORT:-3000}"; \
	DAGSTER_HOME="$$home" AGSSP_CONFIG="$$config" $(VENV)/bin/dagster dev -h 127.0.0.1 -p $${PORT:-3000} -w workspace.yaml

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	@echo "Removes only generated demo output under $(DEMO_ROOT)/ (never user images)."
	rm -rf $(DEMO_ROOT)
