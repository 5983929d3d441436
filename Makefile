# The two commands of the README. Both set up a fresh machine first (scripts/setup.sh).
.PHONY: setup quickstart test

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/pfp run

test: setup
	.venv/bin/python -m pytest -q
