"""draft: the same served KV-cache model as verify, loaded from the draft's settings."""
from specdeploy.triton_repo.models.verify import TritonPythonModel  # noqa: F401
