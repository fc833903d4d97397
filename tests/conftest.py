import os

# Nothing in the tests may reach a hub; set before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from tests.endpoints import ScriptedEndpoint  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (temp SQLite) for the whole session: it takes 10-25 s to start."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(storage)}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture
def scripted():
    server = ScriptedEndpoint()
    yield server
    server.close()
