class SpecDeployError(ValueError):
    """A user-facing error: bad input, missing or corrupt files. The CLI prints it on one line and exits 2."""
