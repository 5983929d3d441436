"""Developer helpers that are not part of the installed product (see pyproject's package list):
a local fleet of Prefect workers for trying the edge path and for its tests."""
