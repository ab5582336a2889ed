# ds01hub: the two commands of the README, for a fresh Debian 12 machine as root.
#
#   make demo       install what is missing, build the images, start the demo hub on :8000
#   make demo-stop  stop the demo hub (PURGE=1, or make demo-purge: also its accounts, state, ...)
#   make install    install ds01hub on this host for real (ds01hub/host/install.py; make uninstall)
#   make test       the same setup, then fast unit tests, then the Docker/e2e/browser tests
#
# The work is done by ds01hub/host/bootstrap.py (stdlib only, so it runs before the venv exists);
# every step skips what is already there. Sites behind a TLS-intercepting proxy set
# CA_BUNDLE=/path/to/site-bundle.pem (copied into the single-user image).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV ?= .venv
CA_BUNDLE ?= /etc/ssl/certs/ca-certificates.crt
PYTEST_ARGS ?=
SLOW_MARKERS := docker or e2e or browser or root or swarm
# Every exit but 0 fails, 5 ("no tests collected") too: a selection that matches nothing (a
# marker or path typo) is a broken run, never a green one. No run here is meant to be empty.
PYTEST := $(VENV)/bin/pytest

PURGE ?=

.PHONY: demo demo-stop demo-purge demo-status install uninstall test test-unit test-slow python3 host host-test venv images lint

demo: host venv images
	$(VENV)/bin/ds01hub demo start

demo-stop:
	@if [ -x $(VENV)/bin/ds01hub ]; then $(VENV)/bin/ds01hub demo stop $(if $(PURGE),--purge); \
	else echo "no demo here"; fi

demo-purge:
	@$(MAKE) --no-print-directory demo-stop PURGE=1

# A real host: system venv in /opt/ds01hub, /etc/ds01hub, units, ... (stdlib: no venv needed).
install: python3
	python3 -m ds01hub.host.install --ca-bundle $(CA_BUNDLE)

uninstall: python3
	python3 -m ds01hub.host.install uninstall $(if $(PURGE),--purge)

demo-status:
	$(VENV)/bin/ds01hub demo status

test: host-test venv images
	@unit=0; slow=0; \
	$(MAKE) --no-print-directory test-unit || unit=$$?; \
	$(MAKE) --no-print-directory test-slow || slow=$$?; \
	echo "unit tests: exit $$unit; docker/e2e/browser tests: exit $$slow"; \
	[ $$unit -eq 0 ] && [ $$slow -eq 0 ]

test-unit:
	$(PYTEST) -m "not ($(SLOW_MARKERS))" -q -ra $(PYTEST_ARGS)

test-slow:
	$(PYTEST) -m "$(SLOW_MARKERS)" -q -ra --durations=15 $(PYTEST_ARGS)

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

python3:
	@command -v python3 >/dev/null || { apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3; }

host: python3
	python3 -m ds01hub.host.bootstrap host

host-test: python3
	python3 -m ds01hub.host.bootstrap host --test-tools

venv: python3
	python3 -m ds01hub.host.bootstrap venv

images:
	$(VENV)/bin/ds01hub bootstrap images --ca-bundle $(CA_BUNDLE)
