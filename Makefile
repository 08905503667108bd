# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv.
# torch: dev/CI pin the CPU wheel (a bare `torch` would pull a multi-GB CUDA build);
# pyproject keeps an open range so GPU images (Dockerfile) bring their own CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# what dev/CI installs: every extra the suite tests (their tests skip, saying why, where one is missing)
EXTRAS ?= dev,ome-zarr,dask,openvino,int8,onnx,bioimageio
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint typecheck unit bench bench-jobs bench-dask bench-instances bench-preview bench-batch bench-smoke load clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/unet-tile serve --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile

typecheck: install
	$(PY) -m mypy

unit: install
	$(PY) -m pytest

test: lint typecheck unit

bench: install
	$(PY) -m bench $(BENCH_ARGS)

bench-jobs: install
	$(PY) -m bench.jobs $(BENCH_ARGS)

# one image on a local Dask cluster of 1 and 2 workers against one machine (1 torch thread each)
bench-dask: install
	$(PY) -m bench.dask $(BENCH_ARGS)

# --output instances --table on a 32768x32768 image of synthetic nuclei against labels: time and peak RSS
bench-instances: install
	$(PY) -m bench.instances $(BENCH_ARGS)

# labels of a 32768x32768 image with and without the preview pyramid a job builds: time, peak RSS, sizes
bench-preview: install
	$(PY) -m bench.preview $(BENCH_ARGS)

# a folder of 20 images: 20 single `unet-tile segment` runs against one batch run (--dir/--outdir)
bench-batch: install
	$(PY) -m bench.batch $(BENCH_ARGS)

# connections under load (not part of `make test`): 5,000 idle + 50 posting clients for 60 s on 127.0.0.1
load: install
	$(PY) -m bench.load --idle 5000 --clients 50 --seconds 60 $(LOAD_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
