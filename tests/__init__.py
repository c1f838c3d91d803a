"""codecstream tests (a package, so that e.g. tests/models/ never shadows the real `models`)."""
