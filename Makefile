# qemu.qmp: `make test` runs everything CI runs; `make demo` shows the collection at work.
# Both set up what they need first (tools/bootstrap.sh): apt packages when missing,
# QEMU 10.0 unpacked beside the system's QEMU 7.2, the tiny test guest, and .venv.

SHELL := /bin/bash
TOP := $(CURDIR)
export PATH := $(TOP)/.venv/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(TOP)/build/collections
export ANSIBLE_PYTHON_INTERPRETER := $(TOP)/.venv/bin/python
export ANSIBLE_LOCALHOST_WARNING := false
export ANSIBLE_INVENTORY_UNPARSED_WARNING := false

QEMU_7 ?= /usr/bin/qemu-system-x86_64
QEMU_10 ?= $(TOP)/.cache/qemu10/bin/qemu-system-x86_64
PYTEST := python -m pytest -q -ra --durations=12
# Each test starts its own QEMU: two workers keep both cores busy.
INTEGRATION := $(PYTEST) -n 2

.PHONY: test demo bootstrap unit integration integration-7 integration-10 molecule sanity lint \
        changelog-lint build bench clean

test: bootstrap
	$(MAKE) --no-print-directory unit changelog-lint sanity lint build integration molecule
	@echo "make test: all passed"

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
	tools/ansible-test.sh sanity --python 3.11

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

demo: bootstrap
	ansible-playbook -i localhost, playbooks/demo.yml -e demo_upgrade_qemu_binary=$(QEMU_10)

clean:
	rm -rf build tests/output
