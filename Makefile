# snf-image: install by copying files, plus the entry points of the README
# (demo, tests, benchmarks). Every path can be overridden on the command line,
# e.g. `make install OSDIR=/usr/share/ganeti/os/snf-image DESTDIR=/tmp/pkg`.

PYTHON      ?= python3
DESTDIR     ?=
OSDIR       ?= /srv/ganeti/os/snf-image
SBINDIR     ?= /usr/local/sbin
DATADIR     ?= /usr/local/share/snf-image
SYSCONFDIR  ?= /etc
VARIANTSDIR ?= $(SYSCONFDIR)/ganeti/snf-image/variants
BACKENDSCONFDIR ?= $(SYSCONFDIR)/snf-image/backends
IMAGE_DIR   ?= /var/lib/snf-image
HELPER_DIR  ?= /var/lib/snf-image/helper

OS_SCRIPTS  = create import export rename verify
OS_DATA     = ganeti_api_version variants.list parameters.list

.PHONY: all install uninstall test test-ganeti demo deps helper bench bench-copy bench-helper bench-create check-syntax

all: check-syntax

check-syntax:
	$(PYTHON) -m py_compile snf-image-host.py snf-image-helper.py snf-image-update-helper.py

install:
	install -d -m 755 $(DESTDIR)$(OSDIR) $(DESTDIR)$(OSDIR)/backends/src $(DESTDIR)$(OSDIR)/backends/dst
	install -m 755 snf-image-host.py $(DESTDIR)$(OSDIR)/snf-image-host.py
	for f in $(OS_SCRIPTS); do install -m 755 os-def/$$f $(DESTDIR)$(OSDIR)/$$f; done
	for f in $(OS_DATA); do install -m 644 os-def/$$f $(DESTDIR)$(OSDIR)/$$f; done
	# bytecode for the production interpreter, so no OS script pays the compile
	-PYTHONDONTWRITEBYTECODE= /usr/bin/python3 -m py_compile $(DESTDIR)$(OSDIR)/snf-image-host.py
	install -d -m 755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(DATADIR)/helper/tasks.d
	install -m 755 snf-image-update-helper.py $(DESTDIR)$(SBINDIR)/snf-image-update-helper
	install -m 644 snf-image-helper.py $(DESTDIR)$(DATADIR)/helper/snf-image-helper.py
	rm -f $(DESTDIR)$(DATADIR)/helper/tasks.d/*
	for f in tasks.d/*; do if [ -x $$f ]; then m=755; else m=644; fi; install -m $$m $$f $(DESTDIR)$(DATADIR)/helper/tasks.d/; done
	install -m 644 defaults.example $(DESTDIR)$(DATADIR)/defaults.example
	install -d -m 755 $(DESTDIR)$(SYSCONFDIR)/default $(DESTDIR)$(VARIANTSDIR) \
		$(DESTDIR)$(BACKENDSCONFDIR)/src $(DESTDIR)$(BACKENDSCONFDIR)/dst
	[ -e $(DESTDIR)$(SYSCONFDIR)/default/snf-image ] || \
		install -m 644 defaults.example $(DESTDIR)$(SYSCONFDIR)/default/snf-image
	[ -e $(DESTDIR)$(VARIANTSDIR)/default.conf ] || \
		install -m 644 /dev/null $(DESTDIR)$(VARIANTSDIR)/default.conf
	install -d -m 755 $(DESTDIR)$(IMAGE_DIR)
	install -d -m 755 $(DESTDIR)$(HELPER_DIR)

# Removes what install copied; keeps the administrator's configuration,
# the images and the built helper (they are data, not program files).
uninstall:
	rm -f $(addprefix $(DESTDIR)$(OSDIR)/,$(OS_SCRIPTS) $(OS_DATA) snf-image-host.py)
	rm -rf $(DESTDIR)$(OSDIR)/__pycache__
	-rmdir $(DESTDIR)$(OSDIR)/backends/src $(DESTDIR)$(OSDIR)/backends/dst $(DESTDIR)$(OSDIR)/backends $(DESTDIR)$(OSDIR)
	rm -f $(DESTDIR)$(SBINDIR)/snf-image-update-helper
	rm -rf $(DESTDIR)$(DATADIR)

deps:
	tools/install-deps.sh

# The README's second command: the whole suite (unit, root/loop, qemu, Ganeti).
test: deps
	$(PYTHON) -m pytest tests

test-ganeti: deps
	$(PYTHON) -m pytest tests/test_ganeti.py

# The README's first command.
demo: deps
	$(PYTHON) tools/demo.py

helper: deps
	$(PYTHON) snf-image-update-helper.py

# every benchmark, one after the other, in one invocation
bench: deps
	set -e; for script in tools/bench-*.py; do echo "== $$script"; $(PYTHON) $$script; done

bench-copy: deps
	$(PYTHON) tools/bench-copy.py

bench-helper: deps
	$(PYTHON) tools/bench-helper.py

bench-create: deps
	$(PYTHON) tools/bench-create.py
