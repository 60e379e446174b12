# qemu.qmp: `make test` runs everything CI runs; `make demo` shows the collection at work.
# Both set up what they need first (tools/bootstrap.sh): apt packages when missing,
# QEMU 10.0 unpacked beside the system's QEMU 7.2, the tiny test guest, and the virtualenvs.

SHELL := /bin/bash
TOP := $(CURDIR)
# The virtualenv whose ansible-core runs everything: .venv (ansible-core 2.19 on Python 3.11,
# requirements-dev.txt) or, for the second lane, .venv-latest (the newest ansible-core on
# Python 3.13, requirements-latest.txt).
VENV ?= .venv
SANITY_PYTHON ?= 3.11
export VENV
export PATH := $(TOP)/$(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(TOP)/build/collections
export ANSIBLE_PYTHON_INTERPRETER := $(TOP)/$(VENV)/bin/python
export ANSIBLE_LOCALHOST_WARNING := false
export ANSIBLE_INVENTORY_UNPARSED_WARNING := false

QEMU_7 ?= /usr/bin/qemu-system-x86_64
QEMU_10 ?= $(TOP)/.cache/qemu10/bin/qemu-system-x86_64
PYTEST := python -m pytest -q -ra --durations=12
# Each test starts its own QEMU: two workers keep both cores busy.
INTEGRATION := $(PYTEST) -n 2

.PHONY: test test-latest demo bootstrap unit integration integration-7 integration-10 molecule sanity lint \
        changelog-lint build bench clean

# Two lanes, the oldest with the oldest and the newest with the newest: ansible-core 2.19 on
# Python 3.11 against QEMU 7.2 (with lint, build and molecule), then the newest ansible-core on
# Python 3.13 against QEMU 10.0. Each QEMU and each ansible-core runs the whole integration suite
# once; `make integration` runs both QEMUs with one ansible-core.
test: bootstrap
	$(MAKE) --no-print-directory unit changelog-lint sanity lint build integration-7 molecule
	$(MAKE) --no-print-directory test-latest
	@echo "make test: all passed"

test-latest: bootstrap
	$(MAKE) --no-print-directory VENV=.venv-latest SANITY_PYTHON=3.13 unit sanity integration-10

bootstrap:
	@tools/bootstrap.sh

unit: bootstrap
	$(PYTEST) tests/unit

integration: integration-7 integration-10

integration-7: bootstrap
	QEMU_BINARY=$(QEMU_7) $(INTEGRATION) tests/integration

integration-10: bootstrap
	QEMU_BINARY=$(QEMU_10) $(INTEGRATION) tests/integration

molecule: bootstrap
	tools/molecule.sh

sanity: bootstrap
	tools/ansible-test.sh sanity --python $(SANITY_PYTHON)

lint: bootstrap
	ansible-lint --profile production

changelog-lint: bootstrap
	antsibull-changelog lint

build: bootstrap
	tools/check-build.sh

bench: bootstrap
	python bench/qmp_round_trip.py
	python bench/module_overhead.py
	python bench/backup_throughput.py
	python bench/backup_engine.py
	python bench/migration_time.py 3
	python bench/migration_engine.py 3
	python bench/backup_lifecycle.py 3
	python bench/fleet.py

demo: bootstrap
	ANSIBLE_CONFIG=playbooks/demo/ansible.cfg ansible-playbook -i localhost, playbooks/demo/demo.yml -e demo_upgrade_qemu_binary=$(QEMU_10)

clean:
	rm -rf build tests/output
