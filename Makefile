# make demo  — build .venv, convert ResNet-50 and print its per-stage error (and timings on a GPU)
# make test  — build .venv, run the test suite (CPU: Triton's interpreter)
PYTHON ?= python3
VENV   ?= .venv
# The CUDA build of torch that runs here on the CPU too; override for another machine.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastres-installed

.PHONY: venv demo test test-zoo test-all lint bench-smoke kernel-report clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/fastres demo

test: venv
	$(PY) -m pytest -q -m "not slow and not zoo"

test-zoo: venv
	$(PY) -m pytest -q tests/test_zoo.py

test-all: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check fastres kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# make bench-smoke   — every benchmark code path on the CPU (interpreter, tiny sizes): JSON, markdown, PNG
bench-smoke: venv
	$(PY) -m benchmarks.smoke --out benchmarks/results/smoke

# make kernel-report — compile the conv kernel per ResNet-50 layer for sm_90/sm_80 on the CPU:
#                      registers, spills, shared memory, occupancy, wgmma/mma (JSON + markdown)
kernel-report: venv
	$(PY) -m benchmarks.kernel_report --out benchmarks/results/kernel_report.json

# make bench-cpu     — the CPU path (interpreter off) against eager, channels_last and torch.compile (freezing):
#                      ResNet-50 fp32, batch {1, 8, 32} x {64², 224²}; JSON in benchmarks/results/cpu/, table printed
.PHONY: bench-cpu
bench-cpu: venv
	env -u TRITON_INTERPRET $(PY) -m benchmarks.bench_cpu --out benchmarks/results/cpu
