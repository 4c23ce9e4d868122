# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# System libraries FFCV 1.0.2 compiles against (pkg-config finds OpenCV and libjpeg-turbo).
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
DEMO_DIR ?= demo

.PHONY: setup system-packages test test-fast demo bench-method bench-train bench-loss gpu-check clean

setup: $(VENV)/.setup-stamp

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "FFCV needs these system packages; install them as root and rerun:" >&2; \
	    echo "  sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

# Re-run only when the dependency list changes; the stamp makes `make setup` idempotent.
$(VENV)/.setup-stamp: pyproject.toml | system-packages
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# FFCV's setup.py imports numpy and pkgconfig while it builds, so the build tools go in first and
	# the whole dependency list (pins in pyproject.toml) resolves in one step without build isolation.
	$(PIP) install -q numpy pkgconfig cython
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

test: setup
	$(VENV)/bin/pytest -q --durations=15

# The unit tier for a quick loop (under 2 minutes): no Ray, no subprocesses, no training runs.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/groupdir demo --out $(DEMO_DIR)

bench-method: setup
	$(VENV)/bin/groupdir bench method --out bench/method

bench-train: setup
	$(VENV)/bin/groupdir bench train --out bench/train

bench-loss: setup
	$(VENV)/bin/groupdir bench loss --out bench/loss

# On a CUDA machine, in under 5 minutes: the Triton kernels against the naive reference at each matmul
# precision (ieee, tf32, bf16; float32 and bfloat16 inputs; values and gradients) and `bench loss` on the
# GPU (times, peak memory and matmul FLOPs per backend and precision); ResNet-50 at 224 px, bf16,
# channels_last on one GPU, fed by FFCV vs by a batch already on the GPU. Writes gpu-check/summary.md.
gpu-check: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(VENV)/bin/groupdir bench loss --out gpu-check/loss --naive-max 1024
	$(VENV)/bin/groupdir bench ceiling --out gpu-check/ceiling --backbone resnet50 --image-size 224 \
	  --batch-size 256 --steps 40 --loader-workers 12 --images 3000 --source-size 256
	{ echo "# gpu-check"; echo; date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; \
	  echo; cat gpu-check/loss/loss.md; echo; cat gpu-check/ceiling/ceiling.md; } > gpu-check/summary.md
	cat gpu-check/summary.md

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench gpu-check .pytest_cache
