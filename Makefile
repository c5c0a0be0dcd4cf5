# Packaging and its proof. The Python project itself needs no make: see README.md
# (scripts/test.sh). Every target here needs root; see docs/packaging.md.
SHELL := /bin/bash
PYTHON ?= .venv/bin/python
# pybuild/pip must not pick up a pyenv or venv python from the caller's PATH.
BUILD_PATH := /usr/sbin:/usr/bin:/sbin:/bin

.PHONY: deb deb-bookworm deb-trixie debs constraints test-systemd test-systemd-trixie clean-deb

## deb: the .deb for Debian 12 (bookworm) in packaging/deb/out/bookworm/
deb: deb-bookworm

## debs: the .debs for Debian 12 (bookworm) and 13 (trixie)
debs: deb-bookworm deb-trixie

deb-bookworm deb-trixie: deb-%:
	env PATH=$(BUILD_PATH) packaging/deb/build.sh $*

## constraints: re-pin constraints.txt from the test venv (after a dependency change)
constraints:
	$(PYTHON) packaging/deb/gen-constraints.py -o constraints.txt

## test-systemd: build the bookworm .deb and prove it under a booted systemd
test-systemd:
	LLMUX_SYSTEMD=1 $(PYTHON) -m pytest -m systemd tests/packaging -v -p no:cacheprovider

test-systemd-trixie:
	LLMUX_SYSTEMD=1 LLMUX_SYSTEMD_RELEASE=trixie $(PYTHON) -m pytest -m systemd tests/packaging \
		-v -p no:cacheprovider

clean-deb:
	rm -rf packaging/deb/out
