# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# System libraries FFCV 1.0.2 compiles against (pkg-config finds OpenCV and libjpeg-turbo).
SYSTEM_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
DEMO_DIR ?= demo

.PHONY: setup system-packages test demo bench-method clean

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
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/groupdir demo --out $(DEMO_DIR)

bench-method: setup
	$(VENV)/bin/groupdir bench method --out bench/method

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench .pytest_cache
