# mailingestd: install and check the operations files (README.md, "Installing", walks through a full install).
#
#   make install       everything below for a host, as root: the package in a virtual environment
#                      $(VENV) (created or upgraded; versions of constraints.txt), mailingestd and mailingestctl
#                      symlinked into $(PREFIX)/bin, the man pages, the unit (its command paths rewritten
#                      to $(VENV)/bin), sysusers.d and tmpfiles.d snippets, and the example
#                      configuration and environment files in $(SYSCONFDIR) unless they exist already.
#                      It does not create the user, start anything or reload systemd: see README.md, "Installing".
#   make install-man   only the man pages, into $(DESTDIR)$(MANDIR)/man{1,5,8}.
#   make check-units   systemd-analyze verify on the unit (any warning fails) and
#                      systemd-analyze security --offline=true --threshold=$(MAX_EXPOSURE) (30 = 3.0:
#                      the threshold is in tenths of the exposure level shown);
#                      needs the Debian package systemd, not a running systemd.
#   make man           render the man pages as plain text on standard output, for a look
#                      (needs groff-base).
#
# Variables (make install VENV=/srv/mailingestd PREFIX=/usr ...):
#   VENV=/opt/mailingestd   virtual environment of the daemon (the unit's ExecStart= points into it)
#   PREFIX=/usr/local       symlinks in $(PREFIX)/bin, man pages in $(PREFIX)/share/man
#   DESTDIR=                staging root for packaging; a virtual environment is not relocatable, so
#                           with DESTDIR build the venv at its final path (VENV) or package it apart
#   PYTHON=python3          the interpreter the virtual environment is made from (3.11 or newer)
#   UNITDIR, SYSUSERSDIR, TMPFILESDIR, SYSCONFDIR   see below

VENV ?= /opt/mailingestd
PREFIX ?= /usr/local
DESTDIR ?=
PYTHON ?= python3
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
TMPFILESDIR ?= /etc/tmpfiles.d
SYSCONFDIR ?= /etc/mailingestd
MAX_EXPOSURE ?= 30
# The mailingestd used by check-units (verify needs ExecStart= to exist): this checkout's venv.
CHECK_BIN ?= $(CURDIR)/.venv/bin

UNIT_BIN := /opt/mailingestd/bin/
MANPAGES := man/mailingestd.8 man/mailingestctl.1 man/mailingestd.toml.5

.PHONY: help install install-venv install-man install-units install-config check-units man

help:
	@sed -n '3,17p' $(MAKEFILE_LIST) | sed 's/^# \{0,1\}//'

install: install-venv install-man install-units install-config

install-venv:
	test -x $(DESTDIR)$(VENV)/bin/python || $(PYTHON) -m venv $(DESTDIR)$(VENV)
	$(DESTDIR)$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(VENV)/bin/python -m pip install --quiet --upgrade -c constraints.txt .
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sf $(VENV)/bin/mailingestd $(DESTDIR)$(PREFIX)/bin/mailingestd
	ln -sf $(VENV)/bin/mailingestctl $(DESTDIR)$(PREFIX)/bin/mailingestctl

install-man:
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 man/mailingestctl.1 $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 man/mailingestd.toml.5 $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 man/mailingestd.8 $(DESTDIR)$(MANDIR)/man8/
	-command -v mandb >/dev/null && test -z "$(DESTDIR)" && mandb -q

install-units:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	sed 's|$(UNIT_BIN)|$(VENV)/bin/|g' systemd/mailingestd.service > $(DESTDIR)$(UNITDIR)/mailingestd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/mailingestd.service
	install -m 0644 systemd/mailingestd.sysusers $(DESTDIR)$(SYSUSERSDIR)/mailingestd.conf
	install -m 0644 systemd/mailingestd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/mailingestd.conf

# Never overwrites an operator's files; the examples also go to $(VENV)/share/mailingestd/etc.
install-config:
	install -d $(DESTDIR)$(SYSCONFDIR)
	test -e $(DESTDIR)$(SYSCONFDIR)/mailingestd.toml || install -m 0640 etc/mailingestd.toml $(DESTDIR)$(SYSCONFDIR)/
	test -e $(DESTDIR)$(SYSCONFDIR)/mailingestd.env || install -m 0640 etc/mailingestd.env $(DESTDIR)$(SYSCONFDIR)/

check-units:
	@command -v systemd-analyze >/dev/null || { echo "check-units: install the Debian package systemd" >&2; exit 1; }
	@test -x $(CHECK_BIN)/mailingestd || \
	  { echo "check-units: no $(CHECK_BIN)/mailingestd (./dev setup, or CHECK_BIN=)" >&2; exit 1; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	sed 's|$(UNIT_BIN)|$(CHECK_BIN)/|g' systemd/mailingestd.service > "$$tmp/mailingestd.service" && \
	out=$$(cd "$$tmp" && systemd-analyze verify --man=no mailingestd.service 2>&1) && test -z "$$out" || \
	  { echo "systemd-analyze verify:"; echo "$$out"; exit 1; } && \
	echo "systemd-analyze verify: no warnings" && \
	sec=$$(cd "$$tmp" && systemd-analyze security --offline=true --no-pager --threshold=$(MAX_EXPOSURE) \
	  mailingestd.service 2>&1); rc=$$?; echo "$$sec" | tail -1; \
	test $$rc -eq 0 || echo "check-units: exposure above $(MAX_EXPOSURE) tenths" >&2; exit $$rc

man:
	@command -v groff >/dev/null || { echo "man: install the Debian package groff-base" >&2; exit 1; }
	@for page in $(MANPAGES); do groff -man -Tutf8 -P-cbou -ww $$page; done
